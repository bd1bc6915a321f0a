"""Lab 8, soak-verdict: verify under load; the soak's verdict on a leaking handler and a clean one.

The article ends: apply these patterns consistently, and verify them under
load with memory profiling. A unit test sees a handler for milliseconds; a
leak of one object per message shows only as memory that keeps rising while
the traffic goes on. ``connserver soak`` is that verification: it drives
ordinary and hostile clients at a running server, samples the server's admin
``/stats``, and judges the trend of its memory cycle after cycle, and whether
threads, fds and connections come back.

Both sides are built-in apps, served as ``connserver serve APP --admin`` serves
them (the admin endpoint on, on 127.0.0.1): what a learner can soak by hand.

- Broken (a demonstration): ``leaky-echo``, :class:`~connserver.apps.leaky.LeakyEchoHandler`:
  an echo that keeps every handler and 64 KiB per message in a module-level
  list. Bounded by the load: at most ``echo_rate`` × ``duration`` messages
  (and the churners' one each), so at most a few dozen MiB.
- Fixed: ``echo``, :class:`~connserver.apps.echo.EchoHandler`: the same echo,
  keeping nothing.

The load is the soak itself (:func:`connserver.soak.runner.run_soak`), run
from this process against each side at once: its own driver thread and
sockets, bounded by the soak's own limits (loopback only, at most
``max_client_connections`` sockets, ``duration`` then ``settle``), not the
:class:`~.driver.Session`'s. Its verdict becomes the load's figures: the RSS
trend it measured (judged here with the soak's own limit, ``max_rss_slope``),
its checks passed and failed, and its verified round trips.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..apps import leaky
from ..apps.echo import EchoHandler
from ..apps.leaky import LeakyEchoHandler
from ..config import Config
from ..soak.runner import SoakPlan, run_soak
from .driver import Session
from .sides import ConnserverSide
from .spec import Check, Figure, Lab, Plan, Side

__all__ = ["LAB", "LeakyEcho", "soak_plan", "soak_time"]


class LeakyEcho(LeakyEchoHandler):
    """BROKEN ON PURPOSE, for ``connserver lab soak-verdict``: ``connserver serve leaky-echo``'s handler."""


class _AdminSide(ConnserverSide):
    """A side with its admin endpoint on, as ``connserver serve --admin 127.0.0.1:0`` has it."""

    @property
    def ports(self) -> Mapping[str, int]:
        admin = self.server.admin_address
        return {} if admin is None else {"admin": admin[1]}


def _retained(side: ConnserverSide) -> Mapping[str, float]:
    # What leaky-echo's module-level list holds: a 64 KiB chunk per message (and every
    # handler, not counted here). The fixed side's process has the module too, empty.
    chunks = sum(1 for kept in list(leaky._retained) if type(kept) is bytes)
    return {"retained": chunks * leaky.RETAINED_BYTES_PER_MESSAGE}


def start_side(side: str, plan: Plan) -> Side:
    handler = LeakyEcho if side == "broken" else EchoHandler
    config = Config(admin_address="127.0.0.1:0", min_spare_threads=0, max_spare_threads=0)
    return _AdminSide(handler, config, figures=_retained)


# --- the load: a soak ----------------------------------------------------------------------

#: The soak's settings that are the lab plan's, by the same names.
_SOAK_SETTINGS = ("duration", "settle", "interval", "cycle", "warmup", "max_rss_slope",
                  "echo_clients", "echo_rate", "idle", "churn_rate", "reset_rate")


def soak_plan(session: Session) -> SoakPlan:
    """The soak the lab runs against ``session``'s side: the plan's load and thresholds."""
    if "admin" not in session.ports:
        raise ConnectionError(f"the {session.side} side has no admin endpoint")
    return SoakPlan(
        target=f"127.0.0.1:{session.address[1]}", admin=f"127.0.0.1:{session.ports['admin']}",
        seed=7, slowloris=0, zero_window=0, oversized_rate=0,
        **{name: session.plan[name] for name in _SOAK_SETTINGS})


def soak_time(plan: Plan) -> float:
    """How long the soak lasts: its baseline (two samples), load and settle."""
    return 2 * plan["interval"] + plan["duration"] + plan["settle"]


class _Progress:
    """The soak's live figures, shown while it runs: the round trips it verified."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def update(self, t: float, phase: str, sample: Any, counts: Mapping[str, Mapping[str, int]]) -> None:
        self.session.set("round_trips", sum(counts.get(kind, {}).get("round_trips", 0)
                                            for kind in ("echo", "churn")))

    def close(self) -> None:
        pass


def drive(session: Session) -> None:
    """One soak against the side; its verdict as figures."""
    document = run_soak(soak_plan(session), _Progress(session))
    verdict = document["verdict"]
    memory = next(check for check in verdict["checks"] if check["name"] == "rss")
    if memory.get("slope_kib_per_min") is not None:   # None: too short to judge
        session.set("rss_slope", memory["slope_kib_per_min"])
    failed = sum(not check["passed"] for check in verdict["checks"])
    session.set("checks_failed", failed)
    session.set("checks_passed", len(verdict["checks"]) - failed)
    driven = document["driver"]
    session.set("round_trips", sum(driven.get(kind, {}).get("round_trips", 0)
                                   for kind in ("echo", "churn")))


LAB = Lab(
    number=8, name="soak-verdict",
    title="verify under load: the soak's verdict on a leaking handler, and on a clean one",
    broken="leaky-echo: keeps 64 KiB a message", fixed="echo: keeps nothing",
    explanation="howto/soak",
    figures=(
        Figure("connections", "open connections"),
        Figure("retained", "kept by the handler", "MiB"),
        Figure("round_trips", "soak: round trips", source="driver"),
        Figure("rss_slope", "soak: RSS trend", "KiB/min", source="driver"),
        Figure("checks_passed", "soak: checks passed", source="driver"),
        Figure("checks_failed", "soak: checks failed", source="driver"),
    ),
    check=Check("rss_slope",
                leaked="The soak found memory rising cycle after cycle, far above its limit: "
                       "its verdict is FAIL (exit status 1), though threads and fds came back.",
                held="The soak found memory flat within its limit, and threads, fds and "
                     "connections back: its verdict is PASS (exit status 0)."),
    full=Plan(load_timeout=24.0, settle_timeout=0.5, threshold=16 * 1024,
              params={"duration": 20.0, "settle": 1.0, "interval": 0.25, "cycle": 1.0,
                      "warmup": 0.25, "max_rss_slope": 16 * 1024.0, "echo_clients": 5,
                      "echo_rate": 25.0, "idle": 10, "churn_rate": 5.0, "reset_rate": 1.0}),
    short=Plan(load_timeout=2.8, settle_timeout=0.25, threshold=64 * 1024,
               params={"duration": 2.0, "settle": 0.3, "interval": 0.1, "cycle": 0.4,
                       "warmup": 0.1, "max_rss_slope": 64 * 1024.0, "echo_clients": 5,
                       "echo_rate": 100.0, "idle": 10, "churn_rate": 5.0, "reset_rate": 1.0}),
    start_side=start_side, drive=drive,
)
