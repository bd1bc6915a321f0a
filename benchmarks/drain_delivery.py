"""Does a graceful drain deliver the replies the server counted as sent? (issue 10, item 1)

Starts a real daemon, ``python -m connserver serve echo --graceful-timeout N``,
importing the ``connserver`` package found in --source-dir (so an old checkout
can be measured against a new one). Connects CLIENTS loopback clients. Each has
a writer thread that streams numbered RECORD-byte records and a reader that
reads the echo slowly: one recv of READ_CHUNK bytes every READ_INTERVAL
seconds. A slow reader is the point: megabytes of replies then sit in the
kernel's buffers, sent by the server but not yet delivered. After WARMUP
seconds the daemon gets SIGTERM; the readers read on at the same pace until
end of stream, a reset, or GRACEFUL_TIMEOUT + 10 s. Every received byte is
checked against what was sent (the stream must be an exact prefix). Each
writer stops at its end of stream, after MAX_SEND bytes or MAX_STREAM_TIME.

Per client it reports what arrived, the daemon's access-log ``bytes_out`` (and
``unacked=``) for that connection, matched by the client's local port, how and
when the stream ended, and whether it ended mid-record; then the daemon's
"stopped: X drained, Y forced" line and exit status. A client is *short* when
the server wrote bytes (bytes_out + unacked) it never received; the log
*overstates* when bytes_out is more than the client received; *all echoed*
means the client got back every byte the server read (bytes_in). Ending
mid-record alone is no loss: the echo stops wherever the server's last read did.

    python benchmarks/drain_delivery.py
    python benchmarks/drain_delivery.py --source-dir /tmp/old-checkout --json

Standard library only; loopback only; every wait is bounded and the daemon is
killed at the end whatever happens. Exit status 0 when the measurement ran, 2
for bad arguments, 3 when the daemon could not be started or connected to.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
START_TIMEOUT = 20.0        # daemon start until its listening line
SOCKET_TIMEOUT = 0.5        # per send/recv call, so every thread notices its deadline
DRAIN_MARGIN = 10.0         # readers give up GRACEFUL_TIMEOUT + this after SIGTERM
EXIT_MARGIN = 15.0          # the daemon is killed if alive GRACEFUL_TIMEOUT + this after SIGTERM
HEADER = 18                 # "CCCC IIIIIIIIIIII " before each record's filler
ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_"

LISTENING = re.compile(r"(?:accepting|listening) on 127\.0\.0\.1:(\d+)")
ACCESS = re.compile(r"#(\d+) (\S+):(\d+) duration=([\d.]+)s bytes_in=(\d+) bytes_out=(\d+) "
                    r"reason=(\S+)(.*)$")
UNACKED = re.compile(r"\bunacked=(\d+)")
STOPPED = re.compile(r"stopped: (\d+) drained, (\d+) forced")


class RecordStream:
    """Client CLIENT's byte stream: record i is a header with both numbers, a filler, a newline.

    Any slice can be regenerated from its offset, so a reader checks what it
    got without the writer keeping a copy of megabytes already sent.
    """

    def __init__(self, client: int, record: int) -> None:
        self.client = client
        self.record = record
        self._filler = ALPHABET * (record // len(ALPHABET) + 2)

    def records(self, first: int, count: int) -> bytes:
        width = self.record - HEADER - 1
        return b"".join(b"%04d %012d %s\n" % (self.client, index,
                                              self._filler[index % 64:index % 64 + width])
                        for index in range(first, first + count))

    def slice(self, offset: int, length: int) -> bytes:
        first = offset // self.record
        last = (offset + length - 1) // self.record
        start = offset - first * self.record
        return self.records(first, last - first + 1)[start:start + length]


@dataclass
class ClientResult:
    """What one client saw, and what the daemon's access log said about its connection."""

    client: int
    local_port: int
    sent: int = 0
    received: int = 0
    received_at_sigterm: int = 0
    end: str = "running"                 # eof, reset, timeout, or an errno name
    end_after_sigterm_s: float | None = None
    writer_end: str = "running"
    prefix_ok: bool = True
    first_mismatch_at: int | None = None
    mid_record: bool = False
    log_id: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    unacked: int = 0
    reason: str | None = None
    stuck: bool = False
    short: int | None = None             # (bytes_out + unacked) - received: written, never arrived
    echo_complete: bool | None = None    # received == bytes_in: all the server read came back
    log_overstates: bool | None = None   # bytes_out > received


@dataclass
class Client:
    """One connection with a writer thread and a slow, paced reader thread."""

    index: int
    sock: socket.socket
    args: argparse.Namespace
    started_at: float
    result: ClientResult = field(init=False)
    read_deadline: float = 0.0
    sigterm_at: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.stream = RecordStream(self.index, self.args.record)
        self.result = ClientResult(self.index, self.sock.getsockname()[1])
        self.read_deadline = (self.started_at + self.args.warmup + self.args.graceful_timeout
                              + DRAIN_MARGIN)
        self.writer = threading.Thread(target=self._write, name=f"drain-writer-{self.index}")
        self.reader = threading.Thread(target=self._read, name=f"drain-reader-{self.index}")

    def start(self) -> None:
        self.writer.start()
        self.reader.start()

    def _write(self) -> None:
        batch = max(1, 8192 // self.args.record)
        deadline = self.started_at + self.args.max_stream_time
        index, pending = 0, memoryview(b"")
        end = "limit"
        while not self.stop.is_set() and time.monotonic() < deadline:
            if not pending:
                if self.result.sent >= self.args.max_send:
                    break
                pending = memoryview(self.stream.records(index, batch))
                index += batch
            try:
                sent = self.sock.send(pending)
            except TimeoutError:
                continue
            except OSError as exc:
                end = _error_name(exc)
                break
            pending = pending[sent:]
            self.result.sent += sent
        else:
            end = "stopped" if self.stop.is_set() else "time limit"
        self.result.writer_end = end

    def _read(self) -> None:
        result = self.result
        while True:
            began = time.monotonic()
            if began >= self.read_deadline:
                result.end = "timeout"
                break
            if self.stop.is_set():          # the run is being torn down early
                result.end = "stopped"
                break
            try:
                data = self.sock.recv(self.args.read_chunk)
            except TimeoutError:
                continue
            except ConnectionResetError:
                result.end = "reset"
                break
            except OSError as exc:
                result.end = _error_name(exc)
                break
            if not data:
                result.end = "eof"
                break
            if result.prefix_ok:
                expected = self.stream.slice(result.received, len(data))
                if data != expected:
                    result.prefix_ok = False
                    result.first_mismatch_at = result.received + next(
                        (i for i, (a, b) in enumerate(zip(data, expected)) if a != b),
                        min(len(data), len(expected)))
            result.received += len(data)
            time.sleep(max(0.0, began + self.args.read_interval - time.monotonic()))
        if self.sigterm_at is not None:
            result.end_after_sigterm_s = round(time.monotonic() - self.sigterm_at, 3)
        self.stop.set()    # the writer has no one to write to any more

    def finish(self, timeout: float) -> None:
        self.stop.set()
        for thread in (self.reader, self.writer):
            if thread.ident is not None:     # started
                thread.join(timeout)
        self.sock.close()
        result = self.result
        result.mid_record = result.received % self.args.record != 0
        result.prefix_ok = result.prefix_ok and result.received <= result.sent


def _error_name(exc: OSError) -> str:
    if exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


class Unavailable(Exception):
    """The daemon could not be started or reached: there is nothing to measure."""


class Daemon:
    """The server process, with its stderr collected by a thread as it comes."""

    def __init__(self, args: argparse.Namespace) -> None:
        env = dict(os.environ, PYTHONPATH=args.source_dir)
        self.command = [args.python, "-m", "connserver", "serve", "echo",
                        "--bind", f"{HOST}:0", "--graceful-timeout", str(args.graceful_timeout)]
        self.imported_from = _imported_from(args, env)
        self.lines: list[str] = []
        self.port: int | None = None
        self.exited_at: float | None = None
        self._listening = threading.Event()
        self.proc = subprocess.Popen(self.command, cwd=args.source_dir, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._stderr = threading.Thread(target=self._collect, name="drain-daemon-stderr")
        self._stderr.start()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            found = LISTENING.search(line)
            if found and self.port is None:
                self.port = int(found.group(1))
                self._listening.set()
        self._listening.set()     # the daemon ended without listening: stop waiting
        try:
            self.proc.wait(10)        # its stderr closes as it exits
            self.exited_at = time.monotonic()
        except subprocess.TimeoutExpired:
            pass

    def wait_listening(self, timeout: float) -> int | None:
        self._listening.wait(timeout)
        return self.port

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _imported_from(args: argparse.Namespace, env: dict[str, str]) -> str:
    """Where the daemon's interpreter finds connserver: proof of which checkout is measured."""
    try:
        probe = subprocess.run([args.python, "-c", "import connserver; print(connserver.__file__)"],
                               cwd=args.source_dir, env=env, capture_output=True, timeout=30,
                               text=True, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    if probe.returncode != 0 or not probe.stdout.strip():
        last = probe.stderr.strip().splitlines()[-1:] or [f"exit status {probe.returncode}"]
        return f"unknown ({last[0]})"
    return probe.stdout.strip()


def measure(args: argparse.Namespace) -> dict:
    daemon = Daemon(args)
    clients: list[Client] = []
    sigterm_at: float | None = None
    report: dict = {"params": {k: v for k, v in vars(args).items() if k != "json"},
                    "command": daemon.command, "connserver_imported_from": daemon.imported_from}
    try:
        port = daemon.wait_listening(START_TIMEOUT)
        if port is None:
            raise Unavailable(f"the daemon did not log a listening address within "
                              f"{START_TIMEOUT:g} s (exit status {daemon.proc.poll()})")
        report["port"] = port
        started_at = time.monotonic()
        for index in range(args.clients):
            sock = socket.create_connection((HOST, port), timeout=5.0)
            sock.settimeout(SOCKET_TIMEOUT)
            clients.append(Client(index, sock, args, started_at))
        for client in clients:
            client.start()
        time.sleep(args.warmup)     # the measured warm-up, not a readiness wait

        sigterm_at = time.monotonic()
        for client in clients:
            client.result.received_at_sigterm = client.result.received
            client.sigterm_at = sigterm_at
            client.read_deadline = sigterm_at + args.graceful_timeout + DRAIN_MARGIN
        os.kill(daemon.proc.pid, signal.SIGTERM)

        for client in clients:
            client.reader.join(max(0.0, sigterm_at + args.graceful_timeout + DRAIN_MARGIN + 2.0
                                   - time.monotonic()))
        code = daemon.wait_exit(sigterm_at + args.graceful_timeout + EXIT_MARGIN - time.monotonic())
        report["daemon_exit_code"] = code
        report["daemon_killed"] = code is None
    except (Unavailable, OSError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        daemon.kill()    # first: a second Ctrl-C during the joins below must not leave it running
        for client in clients:
            client.finish(5.0)
    if sigterm_at is not None and daemon.exited_at is not None and not report.get("daemon_killed"):
        report["daemon_exit_after_sigterm_s"] = round(daemon.exited_at - sigterm_at, 3)
    _match_access_log(daemon.lines, clients)
    report["clients"] = [asdict(client.result) for client in clients]
    report["daemon_log"] = [line for line in daemon.lines if not ACCESS.search(line)]
    report["summary"] = _summary(report, daemon.lines)
    return report


def _match_access_log(lines: list[str], clients: list[Client]) -> None:
    by_port = {client.result.local_port: client.result for client in clients}
    for line in lines:
        found = ACCESS.search(line)
        if not found or found.group(2) != HOST:
            continue
        result = by_port.get(int(found.group(3)))
        if result is None:
            continue
        rest = found.group(8)
        unacked = UNACKED.search(rest)
        result.log_id = int(found.group(1))
        result.bytes_in = int(found.group(5))
        result.bytes_out = int(found.group(6))
        result.reason = found.group(7)
        result.unacked = int(unacked.group(1)) if unacked else 0
        result.stuck = " stuck" in rest
        result.short = result.bytes_out + result.unacked - result.received
        result.log_overstates = result.bytes_out > result.received
        result.echo_complete = result.received == result.bytes_in


def _summary(report: dict, lines: list[str]) -> dict:
    results = report.get("clients", [])
    logged = [r for r in results if r["bytes_out"] is not None]
    stopped = next((STOPPED.search(line) for line in reversed(lines) if STOPPED.search(line)), None)
    ends: dict[str, int] = {}
    for r in results:
        ends[r["end"]] = ends.get(r["end"], 0) + 1
    return {
        "clients": len(results),
        "received_total": sum(r["received"] for r in results),
        "bytes_out_total": sum(r["bytes_out"] for r in logged),
        "unacked_total": sum(r["unacked"] for r in logged),
        "clients_without_access_line": len(results) - len(logged),
        "clients_short": sum(1 for r in logged if r["short"] > 0),
        "clients_log_overstates": sum(1 for r in logged if r["log_overstates"]),
        "clients_echo_complete": sum(1 for r in logged if r["echo_complete"]),
        "clients_mid_record": sum(1 for r in results if r["mid_record"]),
        "clients_not_prefix": sum(1 for r in results if not r["prefix_ok"]),
        "ends": ends,
        "drained": int(stopped.group(1)) if stopped else None,
        "forced": int(stopped.group(2)) if stopped else None,
        "daemon_exit_code": report.get("daemon_exit_code"),
    }


def print_table(report: dict) -> None:
    print(f"daemon: {' '.join(report['command'])}")
    print(f"connserver imported from: {report['connserver_imported_from']}")
    if "error" in report:
        print(f"error: {report['error']}")
    rows = [("client", "port", "at TERM", "received", "bytes_out", "unacked", "short",
             "end", "after TERM s", "all echoed", "mid-rec", "prefix", "reason")]
    for r in report.get("clients", []):
        after = r["end_after_sigterm_s"]
        rows.append((str(r["client"]), str(r["local_port"]), f"{r['received_at_sigterm']:,}",
                     f"{r['received']:,}", _n(r["bytes_out"]), _n(r["unacked"]), _n(r["short"]),
                     r["end"], "-" if after is None else f"{after:.2f}",
                     {True: "yes", False: "no", None: "-"}[r["echo_complete"]],
                     "yes" if r["mid_record"] else "no", "ok" if r["prefix_ok"] else "BAD",
                     (r["reason"] or "-") + (" stuck" if r["stuck"] else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    s = report["summary"]
    print(f"summary: received {s['received_total']:,} of bytes_out {s['bytes_out_total']:,} "
          f"(unacked {s['unacked_total']:,}); short {s['clients_short']}/{s['clients']}, "
          f"log overstates {s['clients_log_overstates']}/{s['clients']}, "
          f"all echoed {s['clients_echo_complete']}/{s['clients']}, "
          f"mid-record {s['clients_mid_record']}/{s['clients']}, "
          f"not a prefix {s['clients_not_prefix']}, no access line "
          f"{s['clients_without_access_line']}; ends {s['ends']}; "
          f"daemon: {s['drained']} drained, {s['forced']} forced, exit {s['daemon_exit_code']}"
          + (f" after {report['daemon_exit_after_sigterm_s']} s"
             if report.get("daemon_exit_after_sigterm_s") is not None else ""))
    for line in report.get("daemon_log", []):
        print(f"  daemon: {line}")


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _positive(kind: type, maximum: float):
    def parse(text: str):
        value = kind(text)
        if not 0 < value <= maximum:
            raise argparse.ArgumentTypeError(f"must be in (0, {maximum}]")
        return value
    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=_positive(int, 500), default=20)
    parser.add_argument("--record", type=_positive(int, 65536), default=100,
                        help="bytes per record, at least 32 (default: 100)")
    parser.add_argument("--read-chunk", type=_positive(int, 1 << 24), default=16384,
                        help="bytes per paced recv (default: 16384)")
    parser.add_argument("--read-interval", type=_positive(float, 10.0), default=0.02,
                        help="seconds between recv calls (default: 0.02)")
    parser.add_argument("--warmup", type=_positive(float, 120.0), default=3.0,
                        help="seconds of streaming before SIGTERM (default: 3)")
    parser.add_argument("--graceful-timeout", type=_positive(float, 300.0), default=10.0)
    parser.add_argument("--max-send", type=_positive(int, 1 << 30), default=50_000_000,
                        help="bytes each writer sends at most (default: 50 MB)")
    parser.add_argument("--max-stream-time", type=_positive(float, 600.0), default=60.0,
                        help="seconds each writer streams at most (default: 60)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs the daemon (default: this one)")
    parser.add_argument("--source-dir", default=REPO_ROOT,
                        help="directory whose connserver package the daemon imports "
                             "(PYTHONPATH and cwd; default: this repository)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()
    if args.record < 32:
        parser.error("--record must be at least 32")
    args.source_dir = os.path.abspath(args.source_dir)
    if not os.path.isdir(os.path.join(args.source_dir, "connserver")):
        parser.error(f"no connserver package in {args.source_dir}")

    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 3 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
