"""Unit tier: logic at memory speed, with fake clocks, no listener and no subprocess.

Rules: timing logic runs on ``connserver.testing.FakeClock``, never on sleeps; a
test that needs a socket uses ``socket.socketpair()`` (the ``socketpair`` fixture);
no server is started. A file lives in the tier where most of its tests belong, so
a few tests here reach further: test_connection's reset test uses a loopback
listener, test_buffers holds 1,000 idle connections to a server, and test_cli's
signal tests run the daemon in a subprocess (one more binds a port).
"""
