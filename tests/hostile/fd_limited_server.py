"""An echo server for the fd-exhaustion scenario, run as a child process.

Usage: ``python fd_limited_server.py LIMIT``. Sets ``RLIMIT_NOFILE`` to LIMIT
(soft and hard), prints its port once accepting, logs to stderr, and shuts
down when its stdin reaches end of file, printing ``clean`` or ``stuck``.
"""

from __future__ import annotations

import logging
import resource
import sys

import connserver
from connserver.apps.echo import EchoHandler


def main() -> int:
    limit = int(sys.argv[1])
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(name)s %(levelname)s %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    server = connserver.Server(("127.0.0.1", 0), EchoHandler,
                               connserver.Config(idle_timeout=60.0))
    try:
        server.start()
        print(server.server_address[1], flush=True)
        sys.stdin.read()   # the parent closes our stdin to stop us
    finally:
        report = server.shutdown(grace=2.0)
        server.server_close()
    print("clean" if report.clean else "stuck", flush=True)
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
