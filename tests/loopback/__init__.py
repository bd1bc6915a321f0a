"""Loopback tier: in-process servers on 127.0.0.1 port 0, driven by real client sockets.

Rules: servers come from the ``serve`` fixture (127.0.0.1, port 0: never a fixed
port); readiness is a condition polled with a deadline (``wait_for``), never a
sleep; every join and wait has a timeout; the leak check runs after every test.
Clocks are real, so deadlines under test are kept short. test_drain's tests of a
lone connection use a socketpair, test_listeners also makes Unix sockets in
tmp_path, and test_plugin runs the pytest plugin in pytester subprocesses, as a
user's project would.
"""
