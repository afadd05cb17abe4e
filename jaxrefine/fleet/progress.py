"""One live progress line for a fleet: done / failed / running / left, time per entry, time left."""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressLine:
    """Redraws one line on ``stream`` (carriage return on a terminal, a new line per change otherwise).

    Time per entry is the fleet's throughput (wall time since start / entries finished in this run),
    so the estimate of the time left includes the parallelism of the workers.
    """

    def __init__(self, total: int, skipped: int = 0, stream=None, enabled: bool = True):
        self.total, self.skipped = total, skipped
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done = self.failed = self.running = 0
        self._last = ""

    def text(self) -> str:
        finished = self.done + self.failed
        left = self.total - self.skipped - finished - self.running
        parts = [f"fleet: {self.done + self.skipped}/{self.total} done", f"{self.failed} failed",
                 f"{self.running} running", f"{left} left"]
        if self.skipped:
            parts[0] += f" ({self.skipped} from before)"
        if finished:
            per = (time.perf_counter() - self.t0) / finished
            parts.append(f"{_duration(per)}/entry")
            parts.append(f"about {_duration(per * (left + self.running))} left")
        return ", ".join(parts)

    def update(self, done: int, failed: int, running: int) -> None:
        self.done, self.failed, self.running = done, failed, running
        self.draw()

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        line = self.text()
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self._last)))
        elif line.split(", about")[0] != self._last.split(", about")[0] or force:  # not every ETA tick
            self.stream.write(line + "\n")
        else:
            return
        self.stream.flush()
        self._last = line

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def say(self, message: str) -> None:
        """A line of its own (e.g. a failure), above the live line."""
        if not self.enabled:
            return
        if self.tty:
            shown = bool(self._last)
            self.stream.write("\r" + message.ljust(len(self._last)) + "\n")
            self._last = ""
            if shown:  # put the live line back under the message
                self.draw()
        else:
            self.stream.write(message + "\n")
        self.stream.flush()
