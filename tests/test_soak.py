"""connserver soak: the duration parser, the slope fit, the verdict, and short real soaks."""

from __future__ import annotations

import json
import re

import pytest

from connserver import cli
from connserver.soak import SoakPlan, SoakError, fit_slope, judge, parse_duration
from connserver.soak_report import format_verdict, nice_ticks, render_html

# A few seconds of every behaviour, sampled four times a second.
SHORT_SOAK = ["--duration", "3s", "--settle", "2s", "--interval", "0.25s", "--warmup", "0.4",
              "--echo-clients", "5", "--echo-rate", "100", "--idle", "10", "--churn-rate", "20",
              "--slowloris", "2", "--drip-interval", "0.3s", "--zero-window", "2",
              "--oversized-rate", "4", "--oversized-wait", "0.5s", "--reset-rate", "4",
              "--seed", "7", "--progress", "plain"]
# Short server deadlines, so zero-window readers and drips are closed within the soak.
SERVER_FLAGS = ["--bind", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--write-timeout", "1",
                "--read-timeout", "1", "--log-level", "info", "--no-access-log"]


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("1.5", 1.5), ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0),
    ("1h30m", 5400.0), ("250ms", 0.25), ("2m30s", 150.0), (" 10M ", 600.0), ("0.5m", 30.0),
])
def test_parse_duration(text, seconds):
    """Durations are plain seconds or number-unit pairs (ms, s, m, h), possibly combined."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "m", "10x", "-5", "1.5.2s", "s10", "1e3", "inf", "10 minutes"])
def test_parse_duration_rejects_nonsense(text):
    """Anything else is a ValueError naming the accepted forms."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_fit_slope():
    """The least-squares slope of an exact line, of symmetric noise around it, and edge cases."""
    xs = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert fit_slope(xs, [3 + 2 * x for x in xs]) == pytest.approx(2.0)
    noisy = [3 + 2 * x + noise for x, noise in zip(xs, [1, -1, 0, 1, -1])]
    assert fit_slope(xs, noisy) == pytest.approx(1.8)
    assert fit_slope(xs, [5.0] * 5) == 0.0
    assert fit_slope([1.0], [1.0]) is None
    assert fit_slope([2.0, 2.0], [1.0, 5.0]) is None


def _samples(rss_per_s: float, end_threads: int = 6, end_fds: int = 10, end_conns: int = 0):
    """Synthetic /stats samples: 2 s baseline, 20 s of load, 3 s settle."""
    samples = []
    for t in range(26):
        phase = "baseline" if t < 2 else "load" if t <= 22 else "settle"
        settled = phase == "settle"
        samples.append({
            "t": float(t), "phase": phase, "rss_bytes": int(40e6 + rss_per_s * max(0, t - 2)),
            "threads": 70, "threads_non_spare": end_threads if settled else 6 if t < 2 else 60,
            "threads_by_role": {"spare": 64, "conn": 0}, "fds": end_fds if settled else 10,
            "connections_active": end_conns if settled else 0, "pool_leased": 0,
            "stuck_threads": 0, "close_reasons": {"eof": t * 10}})
    return samples


PHASES = {"load_start": 2.0, "steady_start": 7.0, "load_end": 22.0, "end": 25.0}
ECHOED = {"echo": {"round_trips": 100}}


def test_judge_passes_a_flat_server_and_fails_each_kind_of_leak():
    """Flat RSS with everything back passes; growth, an extra thread, fd or connection fails."""
    plan = SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2", duration=20)
    verdict = judge(plan, _samples(rss_per_s=0), PHASES, ECHOED)
    assert verdict["passed"], verdict
    assert verdict["close_reasons"] == {"eof": 240}
    growing = judge(plan, _samples(rss_per_s=64 * 1024 * 100), PHASES, ECHOED)
    rss = next(check for check in growing["checks"] if check["name"] == "rss")
    assert not growing["passed"] and not rss["passed"]
    assert rss["slope_kib_per_min"] == pytest.approx(64 * 100 * 60, rel=1e-6)
    # A steep slope over so little growth that it is noise passes.
    assert judge(plan, _samples(rss_per_s=1024), PHASES, ECHOED)["passed"]
    for leftover, failed in (({"end_threads": 7}, "threads"), ({"end_fds": 11}, "fds"),
                             ({"end_conns": 1}, "connections")):
        verdict = judge(plan, _samples(0, **leftover), PHASES, ECHOED)
        assert [c["name"] for c in verdict["checks"] if not c["passed"]] == [failed]
    tolerant = SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2", thread_tolerance=1)
    assert judge(tolerant, _samples(0, end_threads=7), PHASES, ECHOED)["passed"]


def test_report_renders_without_samples_in_a_phase():
    """The text verdict and the HTML page render even from a run that got almost nothing."""
    plan = SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2")
    samples = _samples(0)[:3]
    document = {"plan": {"target": "127.0.0.1:1", "admin": "127.0.0.1:2"}, "phases": PHASES,
                "samples": samples, "sample_failures": [], "driver": {"echo": {}},
                "started_at": "now", "verdict": judge(plan, samples, PHASES, ECHOED)}
    assert "FAIL  rss" in format_verdict(document)
    assert render_html(document).count("<svg") == 4
    assert nice_ticks(0, 47) == [0, 10, 20, 30, 40, 50]


@pytest.mark.parametrize("target", ["10.1.2.3:7070", "192.168.0.1:80", "[2001:db8::1]:7070"])
def test_refuses_a_target_that_is_not_loopback(target, capsys):
    """Without --allow-remote, only 127.0.0.0/8 and ::1 may be soaked (exit status 2)."""
    assert cli.main(["soak", target, "--admin", "127.0.0.1:9", "--progress", "none"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert cli.main(["soak", "127.0.0.1:9", "--admin", "10.0.0.1:9", "--progress", "none"]) == 2


def test_plan_refuses_more_long_lived_clients_than_its_cap():
    """Bounded in count: long-lived clients must fit --max-client-connections."""
    with pytest.raises(SoakError, match="max-client-connections"):
        SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2", idle=900, echo_clients=200)


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


def test_soak_passes_the_echo_app(daemon, tmp_path, capsys):
    """connserver's own echo gets a passing verdict, with the close reasons its clients provoke."""
    status, document, text = _soak(daemon, tmp_path, "echo")
    assert status == 0, text
    reasons = document["verdict"]["close_reasons"]
    assert reasons.get("eof", 0) > 20 and reasons.get("reset", 0) >= 4, reasons
    assert reasons.get("write_deadline", 0) >= 1, reasons   # the zero-window readers
    echo = document["driver"]["echo"]
    assert echo["round_trips"] > 50 and not echo.get("mismatches") and not echo.get("timeouts")
    out, err = capsys.readouterr()
    assert "verdict: PASS" in out and "soak " in err   # plain progress lines on stderr


def test_soak_fails_the_leaky_echo_app(daemon, tmp_path):
    """The deliberately leaking echo fails on its RSS slope alone: threads and fds come back."""
    status, document, text = _soak(daemon, tmp_path, "leaky-echo")
    assert status == 1, text
    failed = {check["name"] for check in document["verdict"]["checks"] if not check["passed"]}
    assert failed == {"rss"}, text
    rss = next(check for check in document["verdict"]["checks"] if check["name"] == "rss")
    assert rss["slope_kib_per_min"] > 10 * 1024, text


def test_soak_framed_protocol_provokes_framing_close_reasons(daemon, tmp_path):
    """Against framed-echo: oversized prefixes end in frame_too_large, drips in read_deadline."""
    status, document, text = _soak(daemon, tmp_path, "framed-echo", "--protocol", "framed")
    assert status == 0, text
    reasons = document["verdict"]["close_reasons"]
    assert reasons.get("frame_too_large", 0) >= 4 and reasons.get("read_deadline", 0) >= 1, reasons
    assert document["driver"]["oversized"].get("server_eof", 0) >= 4
