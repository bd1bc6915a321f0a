"""connserver soak: durations, the memory trend and the verdict on synthetic series, the
driver's identical cycles, the report (the short real soaks: tests/process/test_soak_runs.py)."""

from __future__ import annotations

import pathlib
import random
import re
import types

import pytest

from connserver.daemon import cli
from connserver.soak import runner as soak
from connserver.soak.runner import SoakError, SoakPlan, judge, parse_duration, shortest_judged_duration
from connserver.soak.driver import _Echo, _Reset, _Wire
from connserver.soak.report import CLIENT_EVENTS, format_verdict, nice_ticks, render_html
from connserver.soak.trend import cycle_levels, theil_sen, trend_p_value

MIB = 1024 * 1024
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "howto" / "soak.md"


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


# --- the statistics ------------------------------------------------------------------

def test_theil_sen_ignores_outliers_that_move_least_squares():
    """The median of pairwise slopes: exact on a line, unmoved by a few wild points."""
    xs = [float(x) for x in range(20)]
    assert theil_sen(xs, [3 + 2 * x for x in xs]) == pytest.approx((2.0, 3.0))
    wild = [3 + 2 * x for x in xs]
    wild[4], wild[15], wild[19] = 1e6, -1e6, 5e5
    slope, intercept = theil_sen(xs, wild)
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(3.0)
    assert theil_sen(xs, [5.0] * 20) == (0.0, 5.0)
    assert theil_sen([1.0], [1.0]) is None
    assert theil_sen([2.0, 2.0], [1.0, 5.0]) is None


def test_trend_p_value_tells_a_rise_from_noise():
    """Mann-Kendall: a rise is significant; noise, a flat line or one late jump is not."""
    assert trend_p_value([1, 2, 3, 4]) < 0.05                      # the fewest cycles judged
    assert trend_p_value([float(i) for i in range(30)]) < 1e-6
    assert trend_p_value([5] * 9 + [9]) > 0.05                     # one jump at the end
    assert trend_p_value([7.0] * 10) == 1.0                         # flat (all ties)
    assert trend_p_value([4, 3, 2, 1]) == 1.0                      # falling is no rise
    noise = random.Random(3)
    assert trend_p_value([noise.gauss(0, 1) for _ in range(40)]) > 0.05


def test_cycle_levels_are_medians_of_complete_cycles():
    """One level per complete cycle (an odd sample cannot move it); the unfinished one is dropped."""
    points = [(10.0, 100.0), (10.5, 900.0), (11.0, 102.0),      # cycle 0: median 102
              (12.0, 110.0), (12.9, 111.0),                     # cycle 1
              (16.1, 120.0),                                    # cycle 3 (cycle 2 unsampled)
              (18.2, 500.0)]                                    # cycle 4: not complete
    levels = cycle_levels(points, load_start=10.0, load_end=18.5, cycle=2.0)
    assert [(level.start, level.kib, level.samples) for level in levels] == [
        (10.0, 102.0, 3), (12.0, 110.5, 2), (16.0, 120.0, 1)]


# --- the verdict on synthetic series -----------------------------------------------------

def _run(rss_kib, *, duration=300.0, cycle=5.0, interval=1.0, warmup=0.25, end_threads=6,
         end_fds=10, end_conns=0, **plan_options):
    """A plan and synthetic /stats samples: 2 samples of baseline, the load, 3 of settle.

    ``rss_kib(t, i)`` gives RSS in KiB at t seconds into the load (sample number i).
    """
    plan = SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2", duration=duration, cycle=cycle,
                    interval=interval, warmup=warmup, **plan_options)
    load_start, samples = 2.0, []

    def sample(t, phase, kib, settled=False):
        samples.append({
            "t": t, "phase": phase, "rss_bytes": int(kib * 1024), "threads": 70,
            "threads_non_spare": end_threads if settled else 6 if phase == "baseline" else 60,
            "threads_by_role": {"spare": 64, "conn": 0}, "fds": end_fds if settled else 10,
            "connections_active": end_conns if settled else 0, "pool_leased": 0,
            "stuck_threads": 0, "close_reasons": {"eof": len(samples) * 10}})

    sample(0.0, "baseline", 40_000)
    sample(1.0, "baseline", 40_000)
    steps = round(duration / interval)
    for i in range(steps + 1):
        t = i * interval
        sample(load_start + t + 0.004, "load", rss_kib(t, i))
    load_end = load_start + duration + 0.01
    for k in range(3):
        sample(load_end + k, "settle", rss_kib(duration, steps), settled=True)
    phases = {"load_start": load_start, "load_end": load_end, "end": load_end + 3,
              "cycle": cycle, "warmup_cycles": soak.warmup_cycles(plan),
              "steady_start": load_start + soak.warmup_cycles(plan) * cycle}
    return plan, samples, phases


ECHOED = {"echo": {"round_trips": 100}}


def _memory(plan, samples, phases):
    verdict = judge(plan, samples, phases, ECHOED)
    return verdict, next(check for check in verdict["checks"] if check["name"] == "rss")


def _pages(rng, spread_kib):
    """RSS noise as the kernel counts it: whole 4 KiB pages."""
    return 4 * rng.randint(-spread_kib // 4, spread_kib // 4)


@pytest.mark.parametrize("cycle", [1.0, 5.0])
def test_a_noisy_plateau_with_outliers_passes(cycle):
    """Flat memory with page noise, allocator blips and wild samples: no leak (1 or 5 samples a cycle)."""
    rng = random.Random(1)

    def rss(t, i):
        kib = 52_000 + _pages(rng, 96)
        if i % 37 == 0:
            kib += 50 * 1024            # a /stats read racing a big transient allocation
        if i % 53 == 0:
            kib -= 30 * 1024            # or a trim
        return kib

    verdict, memory = _memory(*_run(rss, cycle=cycle))
    assert verdict["outcome"] == "pass" and memory["outcome"] == "pass", memory["summary"]
    assert abs(memory["slope_kib_per_min"]) < 10, memory


def test_linear_growth_of_a_few_kib_per_cycle_fails():
    """6 KiB per 1 s cycle (360 KiB/min) under page noise, for 10 minutes: a leak."""
    rng = random.Random(2)
    run = _run(lambda t, i: 40_000 + 6 * t + _pages(rng, 16), duration=600, cycle=1, interval=0.25)
    verdict, memory = _memory(*run)
    assert verdict["outcome"] == "fail" and memory["outcome"] == "fail", memory["summary"]
    assert memory["slope_kib_per_min"] == pytest.approx(360, rel=0.05)
    assert memory["summary"].startswith("leak, rising cycle after cycle")
    assert memory["p_value"] < 1e-6 and memory["trend_growth_kib"] > 1024


def test_a_straight_climb_on_a_short_run_is_not_passed_by_a_noise_floor():
    """A 30 s run climbing +5.4 MiB/min to the end (it used to pass, under 2 MiB) is a leak."""
    rng = random.Random(3)
    climb = _run(lambda t, i: 31_000 + 92 * t + _pages(rng, 24), duration=30, cycle=1)
    verdict, memory = _memory(*climb)
    assert not verdict["passed"] and memory["outcome"] == "fail", memory["summary"]
    # A slower climb, too small in total to tell from an allocator settling in: inconclusive.
    verdict, memory = _memory(*_run(lambda t, i: 31_000 + 12 * t + _pages(rng, 8), duration=30,
                                    cycle=1))
    assert verdict["outcome"] == "inconclusive" and memory["outcome"] == "inconclusive", memory
    assert "run longer" in memory["summary"]


def test_a_warm_up_ramp_then_a_plateau_passes():
    """Growth that stops within the warm-up is not judged; growth that stops soon after levels off."""
    rng = random.Random(4)

    def ramp_until(end):
        return lambda t, i: 30_000 + 6_000 * min(t, end) / end + _pages(rng, 32)

    verdict, memory = _memory(*_run(ramp_until(60)))              # the warm-up is 75 s
    assert verdict["outcome"] == "pass", memory["summary"]
    assert memory["summary"].startswith("no leak, the trend is within the limit: ")
    verdict, memory = _memory(*_run(ramp_until(200)))             # half way into the steady phase
    assert verdict["outcome"] == "pass", memory["summary"]
    assert memory["slope_kib_per_min"] > 256 and "levelled off" in memory["summary"]


def test_a_step_at_the_start_of_the_steady_phase_passes():
    """A one-off 2 MiB step early in the steady phase (a pool filling late) is not a trend."""
    rng = random.Random(5)
    verdict, memory = _memory(*_run(lambda t, i: 30_000 + (2048 if t >= 80 else 0) + _pages(rng, 32)))
    assert verdict["outcome"] == "pass" and abs(memory["slope_kib_per_min"]) < 1, memory["summary"]


@pytest.mark.parametrize("cycle", [1.0, 5.0])
def test_one_huge_outlier_does_not_flip_the_verdict(cycle):
    """A single 1 GiB sample neither fails a flat run nor passes a leaking one."""
    rng = random.Random(6)

    def with_outlier(base):
        return lambda t, i: base(t) + (1024 * 1024 if i == 290 else 0) + _pages(rng, 16)

    verdict, memory = _memory(*_run(with_outlier(lambda t: 30_000), cycle=cycle))
    assert verdict["outcome"] == "pass", memory["summary"]
    verdict, memory = _memory(*_run(lambda t, i: 30_000 + 20 * t - (1024 * 1024 if i == 290 else 0),
                                    cycle=cycle))
    assert verdict["outcome"] == "fail" and memory["slope_kib_per_min"] == pytest.approx(1200, rel=0.01)


def test_a_run_too_short_to_judge_is_inconclusive_and_says_how_long_to_run():
    """Fewer than four steady cycles: inconclusive, naming the shortest --duration that would do."""
    plan, samples, phases = _run(lambda t, i: 30_000.0, duration=20)
    verdict, memory = _memory(plan, samples, phases)
    assert verdict["outcome"] == "inconclusive" and not verdict["passed"]
    assert memory["steady_cycles"] == 3 and "too short" in memory["summary"]
    assert shortest_judged_duration(plan) == 30.0 and "--duration 30s" in memory["summary"]
    assert _memory(*_run(lambda t, i: 30_000.0, duration=30))[0]["outcome"] == "pass"


def test_judge_fails_each_kind_of_leftover_and_a_failure_outranks_inconclusive():
    """An extra thread, fd or connection fails, even when memory is inconclusive; tolerances apply."""
    for leftover, failed in (({"end_threads": 7}, "threads"), ({"end_fds": 11}, "fds"),
                             ({"end_conns": 1}, "connections")):
        verdict, _ = _memory(*_run(lambda t, i: 30_000.0, **leftover))
        assert [c["name"] for c in verdict["checks"] if not c["passed"]] == [failed]
        verdict, _ = _memory(*_run(lambda t, i: 30_000.0, duration=20, **leftover))
        assert verdict["outcome"] == "fail"
    verdict, _ = _memory(*_run(lambda t, i: 30_000.0, end_threads=7, thread_tolerance=1))
    assert verdict["passed"]


def test_plan_needs_a_sample_per_cycle_and_a_cycle_within_the_load():
    """A --cycle shorter than --interval, or longer than --duration, is refused."""
    with pytest.raises(SoakError, match="a sample in every cycle"):
        SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2", cycle=0.5, interval=1)
    with pytest.raises(SoakError, match="longer than --duration"):
        SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2", duration=4, cycle=5)
    with pytest.raises(SoakError, match="max-client-connections"):
        SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2", idle=900, echo_clients=200)


def test_inconclusive_exits_with_status_3(monkeypatch, capsys):
    """Exit status: 0 pass, 1 fail, 3 inconclusive; the last line says which."""
    plan, samples, phases = _run(lambda t, i: 30_000.0, duration=20)
    document = {"plan": {"target": "127.0.0.1:1", "admin": "127.0.0.1:2"}, "phases": phases,
                "samples": samples, "sample_failures": [], "driver": ECHOED, "started_at": "now",
                "verdict": judge(plan, samples, phases, ECHOED)}
    monkeypatch.setattr(soak, "run_soak", lambda plan, progress: document)
    args = ["soak", "127.0.0.1:9", "--admin", "127.0.0.1:9", "--progress", "none",
            "--report", "none", "--html", "none"]
    assert cli.main(args) == 3
    out = capsys.readouterr().out
    assert out.rstrip().endswith("verdict: INCONCLUSIVE") and "\n  ??    rss " in out


# --- the driver's identical cycles ----------------------------------------------------

def test_every_cycle_sends_the_same_requests_client_by_client():
    """Each client's random numbers restart every cycle: same sizes and bytes, cycle after cycle."""
    driver = types.SimpleNamespace(seed=11, cycle=0)
    wire = _Wire("framed")

    def requests(client, n=5):
        rng = client.rng()
        return [wire.message(rng.randint(1, 4096), rng) for _ in range(n)]

    first, other, reset = _Echo(driver, 0), _Echo(driver, 1), _Reset(driver, 0)
    cycle0 = requests(first)
    assert requests(other) != cycle0 and requests(reset) != cycle0   # clients differ
    driver.cycle = 1
    assert requests(first) == cycle0                                 # cycles do not
    assert requests(_Echo(driver, 0)) == cycle0                      # nor reconnects


# --- the report -----------------------------------------------------------------------

def _document(rss, **run_options):
    plan, samples, phases = _run(rss, **run_options)
    return {"plan": {"target": "127.0.0.1:1", "admin": "127.0.0.1:2"}, "phases": phases,
            "samples": samples, "sample_failures": [], "started_at": "now",
            "driver": {"echo": {"round_trips": 400, "latency_us": 1_000_000, "connected": 20},
                       "oversized": {"sent": 30, "left_open": 28}},
            "verdict": judge(plan, samples, phases, ECHOED)}


def test_the_memory_chart_draws_the_trend_over_the_data_and_names_the_warm_up():
    """The trend line comes after the RSS line (on top), spans the steady cycles, and is labelled."""
    page = render_html(_document(lambda t, i: 30_000 + 40 * t, duration=60))
    memory_chart = page[page.index('aria-label="Resident memory"'):page.index('aria-label="Threads"')]
    rss_line = memory_chart.index("<title>RSS</title>")
    trend = re.search(r'<line x1="([\d.]+)" y1="[\d.]+" x2="([\d.]+)" y2="[\d.]+" stroke="#c0392b" '
                      r'stroke-width="3"[^>]*><title>trend \+2,400 KiB/min</title>', memory_chart)
    assert trend and trend.start() > rss_line, memory_chart
    assert memory_chart.count('class="level"') == 12                 # one bar per cycle
    assert '>warm-up</text>' in memory_chart and '>steady</text>' in memory_chart
    assert "How memory is judged" in page and page.count("<svg") == 4


def test_the_page_explains_latency_us_and_left_open():
    """latency_us is a sum (the page shows the mean too); left_open is explained where it appears."""
    document = _document(lambda t, i: 30_000.0, duration=30)
    page = render_html(document)
    assert "<dt>latency_us</dt>" in page and "SUM, in microseconds" in page
    assert "latency_us 1,000,000, round_trips 400, mean_rtt_ms 2.50" in page
    assert "<dt>mean_rtt_ms</dt>" in page
    assert "<dt>left_open</dt>" in page and "--oversized-wait" in page
    assert "mean_rtt_ms=2.50" in format_verdict(document)


def test_the_howto_explains_every_client_count():
    """docs/howto/soak.md has a row for every count the page explains."""
    text = DOCS.read_text()
    missing = [event for event in CLIENT_EVENTS if f"| `{event}` |" not in text]
    assert not missing, missing


def test_report_renders_without_samples_in_a_phase():
    """The text verdict and the HTML page render even from a run that got almost nothing."""
    plan, samples, phases = _run(lambda t, i: 30_000.0)
    samples = samples[:3]
    document = {"plan": {"target": "127.0.0.1:1", "admin": "127.0.0.1:2"}, "phases": phases,
                "samples": samples, "sample_failures": [], "driver": {"echo": {}},
                "started_at": "now", "verdict": judge(plan, samples, phases, ECHOED)}
    assert "??    rss          inconclusive, too short" in format_verdict(document)
    assert render_html(document).count("<svg") == 4
    assert nice_ticks(0, 47) == [0, 10, 20, 30, 40, 50]


# --- targets ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["10.1.2.3:7070", "192.168.0.1:80", "[2001:db8::1]:7070"])
def test_refuses_a_target_that_is_not_loopback(target, capsys):
    """Without --allow-remote, only 127.0.0.0/8 and ::1 may be soaked (exit status 2)."""
    assert cli.main(["soak", target, "--admin", "127.0.0.1:9", "--progress", "none"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert cli.main(["soak", "127.0.0.1:9", "--admin", "10.0.0.1:9", "--progress", "none"]) == 2


def test_hello_needs_no_verify_and_its_escapes_and_numbers_are_applied():
    """--hello is refused with --verify; its \\n escape is decoded and %d numbers clients."""
    with pytest.raises(SoakError, match="--hello needs --no-verify"):
        SoakPlan(target="127.0.0.1:1", admin="127.0.0.1:2", hello="nick%d\n")
    args = cli.build_parser().parse_args(["soak", "127.0.0.1:1", "--admin", "127.0.0.1:2",
                                          "--no-verify", "--hello", r"nick%d\n"])
    assert args.hello == "nick%d\n"
    sent: list[bytes] = []
    driver = types.SimpleNamespace(plan=types.SimpleNamespace(hello="nick%d\n"),
                                   hello_numbers=iter(range(1, 10)))
    client = types.SimpleNamespace(driver=driver, send=sent.append)
    _Echo.greet(client)
    _Echo.greet(client)
    assert sent == [b"nick1\n", b"nick2\n"]
