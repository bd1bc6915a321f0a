"""The lab framework without running a lab: registry, plans, verdict, display, driver bounds, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import socket
import subprocess
import sys
import threading

import pytest

from connserver.daemon import cli
from connserver.lab import driver as lab_driver
from connserver.lab.display import (LiveDisplay, PlainDisplay, format_value, format_verdict,
                                    table_lines)
from connserver.lab.registry import labs
from connserver.lab.runner import total_time
from connserver.lab.spec import Figure
from connserver.lab.verdict import judge

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


def _sample(broken: float | None, fixed: float | None, key: str = "threads") -> dict:
    sides = {}
    for side, value in (("broken", broken), ("fixed", fixed)):
        sides[side] = {} if value is None else {key: value}
    return {"t": 0.0, "phase": "settle", "sides": sides}


# --- the registry and the plans -------------------------------------------------------

@pytest.mark.parametrize("lab", labs(), ids=lambda lab: lab.name)
def test_every_lab_fits_its_time_and_has_its_pages(lab):
    """Full runs end within 30 s, short ones within 5 s; docs/lab/NAME.md and the explanation exist."""
    assert total_time(lab, short=False) + 1.0 <= 30.0
    assert total_time(lab, short=True) <= 5.0
    assert (DOCS / "lab" / f"{lab.name}.md").is_file()
    assert (DOCS.parent / lab.explanation_page).is_file()
    assert lab.name in (DOCS / "lab" / "index.md").read_text()


def test_labs_are_numbered_from_one_without_gaps():
    """The list reads 1, 2, 3…: a learner takes them in order."""
    assert [lab.number for lab in labs()] == list(range(1, len(labs()) + 1))


def test_broken_sides_are_labelled_and_not_exported():
    """Broken handlers say BROKEN ON PURPOSE, and `import connserver` does not import the labs."""
    import importlib

    from connserver.lab.registry import LAB_MODULES

    for module_name in LAB_MODULES:
        module = importlib.import_module(module_name)
        broken = [obj for obj in vars(module).values()
                  if isinstance(obj, type) and (obj.__doc__ or "").startswith("BROKEN ON PURPOSE")]
        assert broken, f"{module_name} has no class labelled BROKEN ON PURPOSE"
    code = "import sys, connserver; print(any(m.startswith('connserver.lab') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr


# --- the verdict --------------------------------------------------------------------------

def test_verdict_passes_when_broken_crosses_and_fixed_stays_under():
    """Rises of 40 and 0 against a threshold of 20: the lab showed what it should."""
    lab = labs()[0]
    plan = dataclasses.replace(lab.short, threshold=20)
    verdict = judge(lab, plan, ("broken", "fixed"), _sample(2, 4), _sample(42, 4), {})
    assert verdict["passed"] and verdict["sides"]["broken"]["crossed"]
    assert not verdict["sides"]["fixed"]["crossed"]
    assert verdict["sides"]["broken"]["meaning"] == lab.check.leaked
    assert "read next: docs/lab/" in format_verdict({"verdict": verdict})


@pytest.mark.parametrize("final, failures, phrase", [
    (_sample(12, 4), {}, "the broken side did NOT show its leak"),
    (_sample(42, 30), {}, "the fixed side did NOT hold"),
    (_sample(None, 4), {}, "did NOT show"),
    (_sample(42, 4), {"broken": "ConnectionRefusedError: ..."}, "the load could not run"),
])
def test_verdict_fails_otherwise(final, failures, phrase):
    """Broken under, fixed over, a figure missing, or a failed load: not passed, and said so."""
    lab = labs()[0]
    plan = dataclasses.replace(lab.short, threshold=20)
    verdict = judge(lab, plan, ("broken", "fixed"), _sample(2, 4), final, failures)
    assert not verdict["passed"]
    assert phrase in verdict["summary"]


def test_the_cli_exits_1_when_the_lab_did_not_show_it(monkeypatch, capsys):
    """Exit status 1 when the verdict did not pass; 0 is only for a lab that showed its point."""
    import connserver.lab.runner as runner

    lab = labs()[0]
    verdict = judge(lab, lab.short, ("broken",), _sample(2, 4), _sample(3, 4), {})
    monkeypatch.setattr(runner, "run_lab", lambda *args, **kwargs: {"verdict": verdict})
    assert cli.main(["lab", lab.name, "--broken", "--short"]) == 1
    assert "did NOT show its leak" in capsys.readouterr().out


# --- the command line ---------------------------------------------------------------------

def test_lab_with_no_name_lists_every_lab(capsys):
    """`connserver lab` prints each lab's number, name and title, and how to run one; exit 0."""
    assert cli.main(["lab"]) == 0
    out = capsys.readouterr().out
    for lab in labs():
        assert f"{lab.number}  {lab.name}" in out and lab.title in out
    assert "connserver lab NAME" in out
    assert cli.main(["lab", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listed] == [lab.name for lab in labs()]


def test_an_unknown_lab_is_exit_2_with_the_list(capsys):
    """A name that is no lab says which labs there are, exit code 2."""
    assert cli.main(["lab", "no-such-lab"]) == 2
    err = capsys.readouterr().err
    assert "no lab 'no-such-lab'" in err and labs()[0].name in err


# --- the display --------------------------------------------------------------------------

def test_values_show_their_rise_since_the_baseline():
    """A cell is the value now and its rise: counts, MiB, KiB; a missing figure is '-'."""
    assert format_value(Figure("threads", "threads"), 152, 2) == "152 (+150)"
    assert format_value(Figure("rss", "RSS", "MiB"), 25 * 2 ** 20, 20 * 2 ** 20) == "25.0 MiB (+5.0)"
    assert format_value(Figure("k", "kept", "KiB"), 2048, None) == "2.0 KiB"
    assert format_value(Figure("n", "sent", source="driver"), 7, 0) == "7"
    assert format_value(Figure("threads", "threads"), None, 2) == "-"


@pytest.mark.parametrize("lab", labs(), ids=lambda lab: lab.name)
def test_the_table_fits_80_columns(lab):
    """Every row of every lab's table, with large values, fits a standard terminal."""
    big = {f.key: 123_456_789.0 if f.unit in ("MiB", "KiB") else 12_345 for f in lab.all_figures}
    sample = {"sides": {"broken": big, "fixed": big}}
    baseline = {"sides": {"broken": {k: 0 for k in big}, "fixed": {k: 0 for k in big}}}
    for line in table_lines(lab, ("broken", "fixed"), sample, baseline):
        assert len(line) <= 80, line


def test_live_display_redraws_in_place_and_plain_shows_the_last_sample():
    """On a terminal the table is redrawn over itself; in a log the judged sample is always shown."""
    lab = labs()[0]
    sample = {"t": 1.0, "sides": {"broken": {"threads": 3}, "fixed": {"threads": 2}}}
    stream = io.StringIO()
    live = LiveDisplay(stream, lab, ("broken", "fixed"), 10.0)
    live.update(1.0, "load", sample, None)
    live.update(1.25, "load", sample, None)
    rows = 1 + 1 + len(lab.all_figures)   # progress bar, heading, one per figure
    assert f"\x1b[{rows}A" in stream.getvalue()
    stream = io.StringIO()
    plain = PlainDisplay(stream, lab, ("broken", "fixed"), 10.0)
    plain.update(1.0, "load", sample, None)
    plain.update(1.25, "settle", sample, None)   # within the same second: held back...
    assert "settle" not in stream.getvalue()
    plain.close()                                # ...and shown at the end
    assert stream.getvalue().count("settle") == 2 and "\x1b" not in stream.getvalue()


# --- the driver's bounds ------------------------------------------------------------------

def test_the_load_goes_to_loopback_only_and_within_its_bounds():
    """No session for another host; at most MAX_PARALLEL clients at once."""
    stop = threading.Event()
    with pytest.raises(lab_driver.LoadLimit, match="127.0.0.1 only"):
        lab_driver.Session("broken", ("192.0.2.1", 80), labs()[0].short, stop)
    session = lab_driver.Session("broken", ("127.0.0.1", 9), labs()[0].short, stop)
    with pytest.raises(lab_driver.LoadLimit):
        session.in_parallel(lab_driver.MAX_PARALLEL + 1, lambda index: None)


def test_kept_sockets_stay_open_until_close_all(monkeypatch):
    """A vanished peer's socket outlives the drive; close_open leaves it, close_all closes it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        session = lab_driver.Session("fixed", listener.getsockname(), labs()[0].short,
                                     threading.Event())
        kept, plain = session.connect(keep=True), session.connect()
        accepted = [listener.accept()[0] for _ in range(2)]
        try:
            session.close_open()
            assert plain.fileno() == -1 and kept.fileno() != -1
            session.close_all()
            assert kept.fileno() == -1
        finally:
            for sock in accepted:
                sock.close()
