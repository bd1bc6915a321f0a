"""The --workers supervisor as a terminal drives it: Ctrl-C drains, the exit status tells."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

from connserver.testing import wait_for
from tests.conftest import LINGERING_HANDLER

LINGERING = LINGERING_HANDLER   # ignores the drain until forced (see conftest)

# Deaf to the drain and to the force: its thread outlives the shutdown.
STUCK = """
import threading
import connserver
class Stuck(connserver.Handler):
    def handle(self):
        self.conn.sendall(self.conn.recv())
        threading.Event().wait()
"""


def start(daemon, *args: str, workers: int = 2):
    """A supervisor in a process group of its own, as a shell starts a job: (process, port, pids)."""
    process = daemon(*args, "--bind", "127.0.0.1:0", "--workers", str(workers),
                     start_new_session=True)
    port = int(process.read_until(r"starting %d workers on 127\.0\.0\.1:(\d+)" % workers).group(1))
    pids, accepting = [], 0
    while len(pids) < workers or accepting < workers:   # the two kinds of line interleave
        match = process.read_until(r"started worker (\d+)|accepting on 127\.0\.0\.1:%d" % port)
        if match.group(1):
            pids.append(int(match.group(1)))
        else:
            accepting += 1
    return process, port, pids


def ctrl_c(process) -> None:
    """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group."""
    os.killpg(process.proc.pid, signal.SIGINT)


def connect_echoed(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"x")
    assert client.recv(1) == b"x"
    return client


def clients_on_every_worker(port: int, pids: list[int]) -> list[socket.socket]:
    """Connect until each worker serves at least one client (the kernel picks the worker)."""
    clients: list[socket.socket] = []
    try:
        while not all(connections_held(pid, port) for pid in pids):
            assert len(clients) < 100, f"the kernel never picked every worker: {pids}"
            clients.append(connect_echoed(port))
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` whose sockets ``pid`` holds (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    held = 0
    with open(f"/proc/{pid}/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and int(local.split(":")[1], 16) == port and inode in inodes:
                held += 1
    return held


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_ctrl_c_drains_every_worker(daemon):
    """Ctrl-C to the process group: each worker gets one SIGTERM and drains; exit status 0."""
    process, port, pids = start(daemon, "echo", "--graceful-timeout", "5")
    clients = clients_on_every_worker(port, pids)
    try:
        started = time.monotonic()
        ctrl_c(process)
        for client in clients:
            assert client.recv(1) == b""   # end of stream: a reset would raise
        assert process.wait() == 0
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    output = process.output()
    stopped = [(int(drained), int(forced)) for drained, forced in
               re.findall(r"stopped: (\d+) drained, (\d+) forced", output)]
    assert len(stopped) == 2 and all(forced == 0 for _, forced in stopped), output
    assert sum(drained for drained, _ in stopped) == len(clients)
    assert "forcing shutdown" not in output and "killing it" not in output
    assert "stopped: all 2 workers exited 0" in output
    # A drain of idle echo clients takes milliseconds; a worker that slept
    # through it would be killed only after graceful + 5 s = 10 s.
    assert elapsed < 4, f"took {elapsed:.1f} s"
    for pid in pids:
        assert wait_for(lambda: not alive(pid)), f"worker {pid} outlived its supervisor"


def test_a_second_ctrl_c_forces(daemon, tmp_path):
    """A second Ctrl-C is forwarded as a second SIGTERM: a drain that would take 60 s ends now."""
    (tmp_path / "lingering.py").write_text(LINGERING)
    process, port, _ = start(daemon, "lingering:Lingering", "--graceful-timeout", "60", workers=1)
    with connect_echoed(port) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ctrl_c(process)
        process.read_until(r"SIGTERM: draining")
        started = time.monotonic()
        ctrl_c(process)
        assert process.wait() == 0
    assert time.monotonic() - started < 5
    output = process.output()
    assert output.count("draining (up to") == 1
    assert "SIGTERM again: forcing shutdown now" in output


def test_a_stop_while_workers_start_is_clean(daemon):
    """SIGTERM while workers are still starting: nothing to drain, so they and it exit 0."""
    process = daemon("echo", "--bind", "127.0.0.1:0", "--workers", "2")
    process.read_until(r"started worker \d+")
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    output = process.output()
    assert "worker failed" not in output and "during the drain" not in output
    assert "stopped: all 2 workers exited 0" in output


def test_a_worker_that_exits_1_makes_the_supervisor_exit_1(daemon, tmp_path):
    """A worker that ends its drain with exit 1 (a stuck thread) fails the supervisor too."""
    (tmp_path / "stuck.py").write_text(STUCK)
    process, port, pids = start(daemon, "stuck:Stuck", "--graceful-timeout", "0.2", workers=1)
    with connect_echoed(port):
        ctrl_c(process)
        assert process.wait() == 1
    output = process.output()
    assert f"worker {pids[0]} (slot 0) exited 1 during the drain" in output
    assert "slot 0: exited 1" in output


def test_a_worker_killed_while_draining_makes_the_supervisor_exit_1(daemon, tmp_path):
    """A worker killed by a signal during the drain is no clean stop: exit 1, and the log says so."""
    (tmp_path / "lingering.py").write_text(LINGERING)
    process, port, pids = start(daemon, "lingering:Lingering", "--graceful-timeout", "60")
    clients = clients_on_every_worker(port, pids)
    try:
        for client in clients:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ctrl_c(process)
        for _ in pids:
            process.read_until(r"SIGTERM: draining")
        os.kill(pids[0], signal.SIGKILL)
        process.read_until(r"worker %d \(slot 0\) was killed by SIGKILL during the drain" % pids[0])
        ctrl_c(process)   # force the other one
        assert process.wait() == 1
    finally:
        for client in clients:
            client.close()
    output = process.output()
    assert f"worker {pids[1]} (slot 1) exited 0" in output
    assert "1 of 2 worker slots did not end cleanly (slot 0: was killed by SIGKILL)" in output


def test_a_crashed_worker_waiting_for_its_restart_makes_the_supervisor_exit_1(daemon):
    """Stopped while a slot waits out a crash's back-off: that slot failed, so exit 1."""
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # Every worker fails at start: its admin endpoint's port is taken.
        process = daemon("echo", "--bind", "127.0.0.1:0", "--workers", "1",
                         "--admin", f"127.0.0.1:{taken.getsockname()[1]}")
        process.read_until(r"exited 1 after [\d.]+ s; restarting in")
        process.signal(signal.SIGTERM)
        assert process.wait() == 1
    finally:
        taken.close()
    assert "slot 0: exited 1" in process.output()


def test_sighup_and_sigusr1_reach_the_workers_and_the_supervisor_survives(daemon):
    """SIGHUP/SIGUSR1 to the supervisor (what `systemctl kill -s HUP` does) are passed on to
    every worker (census logged by each) instead of killing the supervisor."""
    process, port, pids = start(daemon, "echo")
    process.signal(signal.SIGHUP)
    process.read_until(r"forwarding SIGHUP to 2 workers")
    process.signal(signal.SIGUSR1)
    process.read_until(r"forwarding SIGUSR1 to 2 workers")
    for _ in range(2):
        process.read_until(r"census: ")
    assert process.proc.poll() is None   # still supervising
    for pid in pids:
        os.kill(pid, 0)                  # and every worker is alive
    with connect_echoed(port):
        pass
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
