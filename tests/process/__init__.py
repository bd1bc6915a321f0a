"""Process tier: whole processes, ``python -m connserver serve ...`` or an external service.

Rules: the daemon starts through the ``daemon`` fixture (tests/conftest.py), which
kills it at teardown; it binds port 0 and the test reads the port, and readiness,
from its log (``Daemon.port()``, ``read_until()``), never from a sleep; signals
go to the process (or its group) as a terminal or systemd would send them. A
missing service or tool (HAProxy) goes through ``tests.conftest.unavailable()``:
skipped locally, a failure under CI=true.
"""
