"""Short real soaks: `connserver soak` against the daemon's echo, leaky-echo and framed-echo.

Each starts `python -m connserver serve` in a subprocess and soaks it for four seconds.
"""

from __future__ import annotations

import json
import re

from connserver.daemon import cli
from connserver.soak.report import format_verdict

# Four seconds of every behaviour in cycles of half a second, sampled eight times a second.
# A run this short can only catch gross leaks: --max-rss-slope 32 MiB/min lets the echo
# server's allocator settle in and still fails leaky-echo (hundreds of MiB/min). One
# second of settle: threads, fds and connections are back at the first or second sample
# after the load (0.13 s), and the verdict compares the last one with the baseline.
SHORT_SOAK = ["--duration", "4s", "--cycle", "0.5s", "--settle", "1s", "--interval", "0.125s",
              "--max-rss-slope", "32768",
              "--echo-clients", "5", "--echo-rate", "100", "--idle", "10", "--churn-rate", "20",
              "--slowloris", "2", "--drip-interval", "0.3s", "--zero-window", "2",
              "--oversized-rate", "4", "--oversized-wait", "0.5s", "--reset-rate", "4",
              "--seed", "7", "--progress", "plain"]
# Short server deadlines, so zero-window readers and drips are closed within the soak.
SERVER_FLAGS = ["--bind", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--write-timeout", "1",
                "--read-timeout", "1", "--log-level", "info", "--no-access-log"]


def _start(daemon, app: str):
    process = daemon(app, *SERVER_FLAGS)
    port = process.port()
    pattern = r"admin endpoint on http://127\.0\.0\.1:(\d+)/"
    admin = next((m.group(1) for line in process.lines if (m := re.search(pattern, line))), None)
    return port, admin or process.read_until(pattern).group(1)


def _soak(daemon, tmp_path, app: str, *extra: str) -> tuple[int, dict, str]:
    port, admin = _start(daemon, app)
    report, page = tmp_path / f"{app}.json", tmp_path / f"{app}.html"
    status = cli.main(["soak", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", *SHORT_SOAK,
                       "--report", str(report), "--html", str(page), *extra])
    document = json.loads(report.read_text())
    assert page.read_text().count("<svg") == 4
    return status, document, format_verdict(document)


def _memory_check(document):
    return next(check for check in document["verdict"]["checks"] if check["name"] == "rss")


def test_soak_passes_the_echo_app(daemon, tmp_path, capsys):
    """connserver's own echo passes, with the close reasons its clients provoke."""
    status, document, text = _soak(daemon, tmp_path, "echo")
    assert status == 0, text
    memory = _memory_check(document)
    assert memory["steady_cycles"] >= 5 and memory["slope_kib_per_min"] < 32768, text
    reasons = document["verdict"]["close_reasons"]
    assert reasons.get("eof", 0) > 20 and reasons.get("reset", 0) >= 4, reasons
    assert reasons.get("write_deadline", 0) >= 1, reasons   # the zero-window readers
    echo = document["driver"]["echo"]
    assert echo["round_trips"] > 50 and not echo.get("mismatches") and not echo.get("timeouts")
    out, err = capsys.readouterr()
    assert "verdict: PASS" in out and "soak " in err   # plain progress lines on stderr


def test_soak_fails_the_leaky_echo_app(daemon, tmp_path):
    """The deliberately leaking echo fails on memory alone: threads and fds come back."""
    status, document, text = _soak(daemon, tmp_path, "leaky-echo")
    assert status == 1, text
    failed = {check["name"] for check in document["verdict"]["checks"] if not check["passed"]}
    assert failed == {"rss"}, text
    memory = _memory_check(document)
    assert memory["outcome"] == "fail" and memory["summary"].startswith("leak, "), text
    assert memory["slope_kib_per_min"] > 64 * 1024 and memory["p_value"] < 0.01, text


def test_soak_framed_protocol_provokes_framing_close_reasons(daemon, tmp_path):
    """Against framed-echo: oversized prefixes end in frame_too_large, drips in read_deadline."""
    status, document, text = _soak(daemon, tmp_path, "framed-echo", "--protocol", "framed")
    assert status == 0, text
    reasons = document["verdict"]["close_reasons"]
    assert reasons.get("frame_too_large", 0) >= 4 and reasons.get("read_deadline", 0) >= 1, reasons
    assert document["driver"]["oversized"].get("server_eof", 0) >= 4
