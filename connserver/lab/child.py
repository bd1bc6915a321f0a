"""One side of a lab in a process of its own: ``python -m connserver.lab.child NAME SIDE PLAN``.

The runner starts two of these (``SIDE`` is ``broken`` or ``fixed``, ``PLAN``
``full`` or ``short``), so each side's threads, fds and RSS are its own to
measure. The child starts the side's server on 127.0.0.1 port 0 and talks to
the runner in JSON lines: it writes ``{"ready": true, "port": N, "ports": {...}}``
(the side's other ports by name, if it has any) on stdout,
then answers each ``stats`` line on stdin with the side's figures, and stops
on ``stop``.

It also stops by itself, whatever happens to the runner: at the end of its
stdin (the runner exited or was killed: the pipe closes), and in any case
after :data:`MAX_LIFETIME` seconds. It then ends with ``os._exit``, since a
broken side's threads may be blocked forever (that is the lesson) and a
normal exit would wait for them.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import threading
import time
from typing import Any, BinaryIO

from .registry import find
from .spec import SIDES, Side

__all__ = ["main", "MAX_LIFETIME"]

#: Seconds after which a child stops whatever it was told: no lab runs this long.
MAX_LIFETIME = 90.0
_STOP_TIMEOUT = 1.0


def _write(stream: BinaryIO, document: dict[str, Any]) -> None:
    stream.write(json.dumps(document).encode() + b"\n")
    stream.flush()


def _figures(side: Side) -> dict[str, Any]:
    try:
        return {"figures": dict(side.figures())}
    except Exception as exc:   # one failed look is a gap in the table, not the end of the lab
        return {"error": f"{type(exc).__name__}: {exc}"}


def _stop(side: Side) -> None:
    """Stop the side in a thread, waiting at most _STOP_TIMEOUT: stopping must not hang."""
    stopper = threading.Thread(target=side.stop, name="connserver-lab-stop", daemon=True)
    stopper.start()
    stopper.join(_STOP_TIMEOUT)


def serve(side: Side, commands: BinaryIO, replies: BinaryIO, lifetime: float = MAX_LIFETIME) -> None:
    """Answer the runner until ``stop``, the end of ``commands``, or ``lifetime`` seconds."""
    expires_at = time.monotonic() + lifetime
    pending = b""
    fd = commands.fileno()
    while True:
        remaining = expires_at - time.monotonic()
        if remaining <= 0:
            return
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            command = line.strip().decode(errors="replace")
            if command == "stats":
                _write(replies, _figures(side))
            elif command == "stop":
                return
            else:
                _write(replies, {"error": f"unknown command {command!r}"})


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[1] not in SIDES or args[2] not in ("full", "short"):
        sys.stderr.write("usage: python -m connserver.lab.child NAME broken|fixed full|short\n")
        os._exit(2)
    name, side_name, plan_name = args
    # An application entry point, like the CLI: errors go to stderr, which the
    # runner keeps and shows if this side fails. Warnings a broken side provokes
    # on purpose (one per pinned buffer...) would only bury them.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    replies = sys.stdout.buffer
    try:
        lab = find(name)
        side = lab.start_side(side_name, lab.plan(plan_name == "short"))
        # Once before the baseline, so what a first look costs (importing pympler,
        # say) is not counted as the load's doing.
        _figures(side)
        _write(replies, {"ready": True, "port": side.address[1],
                         "ports": dict(getattr(side, "ports", {}))})
    except Exception:
        logging.getLogger("connserver.lab").exception("the %s side of lab %s did not start",
                                                      side_name, name)
        sys.stderr.flush()
        os._exit(1)
    try:
        serve(side, sys.stdin.buffer, replies)
    finally:
        _stop(side)
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
