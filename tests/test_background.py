"""core/background.py: work on a thread of its own that a process ending meanwhile waits for."""
import atexit
import threading
import time

import pytest

from jaxrefine.core import background


def test_started_work_is_waited_for_until_it_ends():
    release, entered = threading.Event(), threading.Event()

    def work():
        entered.set()
        release.wait(10.0)
        return threading.current_thread().name

    future = background.start(work, "test")
    assert entered.wait(10.0)
    assert future in background._running and not future.done()
    background.wait_for_all(timeout=0.05)  # bounded: returns with the work still running
    assert not future.done() and future in background._running
    release.set()
    background.wait_for_all()
    assert future.done() and future.result() == "jaxrefine-test"
    assert future not in background._running


def test_an_exception_reaches_whoever_asks_and_the_exit_hook_is_registered_once(monkeypatch):
    registered = []
    monkeypatch.setattr(background, "_registered", [])

    def register(fn, *args, **kwargs):
        time.sleep(0.05)  # a slow registration: the other threads reach start() meanwhile
        registered.append(fn)

    monkeypatch.setattr(atexit, "register", register)

    def fail():
        raise ValueError("bad")

    barrier = threading.Barrier(4)
    futures = []

    def starter():
        barrier.wait(10.0)
        futures.append(background.start(fail, "fail"))

    threads = [threading.Thread(target=starter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    background.wait_for_all()
    assert registered == [background.wait_for_all]  # four threads started work at once: one registration
    assert len(futures) == 4
    for f in futures:
        with pytest.raises(ValueError, match="bad"):
            f.result()
        assert f not in background._running
