"""Every side's process ends, whatever happens: told to, killed, orphaned, or the run interrupted."""

from __future__ import annotations

import os
import signal
import time

import pytest

from connserver.lab import runner
from connserver.lab.children import Child
from connserver.lab.registry import find
from connserver.testing import wait_for


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def test_a_child_answers_then_stops_when_told():
    """ready with a port, figures on `stats`, a clean exit on `stop`."""
    child = Child("vanished-peer", "fixed", "short")
    try:
        assert child.wait_ready() > 0
        assert child.stats()["figures"]["connections"] == 0
    finally:
        child.end()
    assert child.stopped_cleanly and child.process.returncode == 0


def test_a_child_that_does_not_answer_is_killed_within_a_second():
    """A stopped (SIGSTOP) child cannot obey `stop`: end() kills it after a second."""
    child = Child("vanished-peer", "broken", "short")
    try:
        child.wait_ready()
        os.kill(child.pid, signal.SIGSTOP)
        started = time.monotonic()
        child.end()
        assert time.monotonic() - started < 3.0
    finally:
        child.end()
    assert child.stopped_cleanly is False and child.process.returncode == -signal.SIGKILL


def test_a_child_ends_by_itself_when_its_runner_is_gone():
    """The end of its stdin (the runner died) makes a child stop on its own."""
    child = Child("vanished-peer", "fixed", "short")
    try:
        child.wait_ready()
        assert child.process.stdin is not None
        child.process.stdin.close()            # what the runner's death does to the pipe
        assert child.process.wait(10) == 0
    finally:
        child.end()


def test_an_interrupted_run_ends_every_child(monkeypatch):
    """Ctrl-C in the middle of the load: both processes end, the driver's sockets close."""
    started: list[Child] = []

    class Recorded(Child):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    class Interrupting:
        def update(self, t, phase, sample, baseline):
            if phase == "load":
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(runner, "Child", Recorded)
    with pytest.raises(KeyboardInterrupt):
        runner.run_lab(find("vanished-peer"), True, ("broken", "fixed"), Interrupting())
    assert len(started) == 2
    assert wait_for(lambda: all(_gone(child.pid) for child in started), 5.0)
