"""The runner's end of a side's child process: start it, ask it, and always end it.

A :class:`Child` is ``python -m connserver.lab.child NAME SIDE PLAN`` with
pipes on stdin and stdout (JSON lines, see :mod:`.child`) and its stderr in a
temporary file, shown if it fails. Every wait has a timeout; :meth:`Child.end`
asks it to stop, waits a second, then kills it, and is safe to call twice.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["Child", "ChildError", "START_TIMEOUT", "ASK_TIMEOUT"]

START_TIMEOUT = 20.0    # seconds for a child to import connserver and start its server
ASK_TIMEOUT = 2.0       # seconds for a child to answer one question
_END_TIMEOUT = 1.0      # seconds a child has to stop before it is killed
_KILL_TIMEOUT = 5.0     # a safety net: SIGKILL ends a process at once

# The directory holding the connserver package, so the child imports this same copy
# even when the command was run from a source tree that is not installed.
_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parents[2])


class ChildError(RuntimeError):
    """A side's process failed to start or to answer; the message ends with its stderr."""


class Child:
    """One side's server process."""

    def __init__(self, lab: str, side: str, plan: str) -> None:
        self.side = side
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "connserver.lab.child", lab, side, plan],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
            bufsize=0, close_fds=True)
        self.pid = self.process.pid
        self.port: int | None = None
        self.ports: dict[str, int] = {}   # the side's other ports, by name (an admin endpoint)
        self._pending = b""
        self.stopped_cleanly: bool | None = None

    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        expires_at = time.monotonic() + timeout
        while b"\n" not in self._pending:
            remaining = expires_at - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"the {self.side} side did not answer within {timeout:g} s"
                                 + self._stderr_tail())
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if readable:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise ChildError(f"the {self.side} side's process ended "
                                     f"(status {self.process.poll()})" + self._stderr_tail())
                self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            raise ChildError(f"the {self.side} side wrote {line[:200]!r}, not a JSON line") from None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> int:
        """Wait for the child's server to listen; return its port."""
        reply = self._read_line(timeout)
        if not reply.get("ready"):
            raise ChildError(f"the {self.side} side said {reply!r} instead of ready")
        self.port = int(reply["port"])
        self.ports = {str(name): int(port) for name, port in reply.get("ports", {}).items()}
        return self.port

    def stats(self, timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
        """The side's own figures: ``{"figures": {...}}`` or ``{"error": "..."}``."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(b"stats\n")
        except OSError as exc:
            raise ChildError(f"the {self.side} side's process is gone ({exc.strerror or exc})"
                             + self._stderr_tail()) from exc
        return self._read_line(timeout)

    def end(self) -> None:
        """Ask the child to stop; kill it if it has not within a second. Idempotent."""
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.write(b"stop\n")
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(_END_TIMEOUT)
                self.stopped_cleanly = True
            except subprocess.TimeoutExpired:
                self.stopped_cleanly = False
                self.process.kill()
                self.process.wait(_KILL_TIMEOUT)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()

    def _stderr_tail(self, limit: int = 2000) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; its stderr:\n{text[-limit:]}" if text else ""
