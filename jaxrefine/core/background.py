"""Work on a thread of its own that a process ending meanwhile waits for.

The refinement starts some work ahead on background threads: the L-BFGS program's compilation while the setup
fits the mask and scales (:func:`jaxrefine.core.cache.prepare_exported`), a macrocycle's solvent mask beside its B
block (:func:`jaxrefine.problem.xray_state.start_f_mask`).  That work runs XLA programs, and XLA code (or its
callbacks) on a thread while the interpreter shuts down can crash the process, so a process that ends while such
work runs (an error, an interrupt, a notebook closed) waits for it first, up to EXIT_WAIT_S.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import threading

EXIT_WAIT_S = 120.0
_running: set = set()  # futures of start() not done yet
_registered: list = []  # [True] once wait_for_all is registered with atexit
_lock = threading.Lock()  # start() may be called from several threads (the registration above happens once)


def start(fn, name: str) -> concurrent.futures.Future:
    """Run ``fn()`` on a daemon thread named ``jaxrefine-<name>``; the returned Future holds its result or the
    exception it raised.  Waited for at interpreter exit (see the module docstring)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def work():
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks the Future
            future.set_exception(exc)

    with _lock:
        if not _registered:
            atexit.register(wait_for_all)
            _registered.append(True)
        _running.add(future)
    future.add_done_callback(_finished)
    threading.Thread(target=work, name=f"jaxrefine-{name}", daemon=True).start()
    return future


def _finished(future) -> None:
    with _lock:
        _running.discard(future)


def wait_for_all(timeout: float = EXIT_WAIT_S) -> None:
    """Wait up to ``timeout`` seconds for every :func:`start` still running."""
    with _lock:
        pending = list(_running)
    concurrent.futures.wait(pending, timeout=timeout)
