"""Lab 4's books: which connections count as held past their timeout, and the peak that stays."""

from __future__ import annotations

from connserver.lab.slowloris import Served
from connserver.testing import FakeClock


def test_held_counts_open_connections_served_past_the_bound_and_the_peak_stays():
    """Held: open and served longer than held_after; the most held at once outlives them."""
    clock = FakeClock()
    served = Served(held_after=2.0, clock=clock)
    first, second = served.begin(), served.begin()
    clock.advance(1.0)
    third = served.begin()
    assert served.figures() == {"held": 0, "held_peak": 0}
    clock.advance(1.5)                     # the first two at 2.5 s, the third at 1.5 s
    assert served.figures() == {"held": 2, "held_peak": 2}
    served.end(first)
    served.end(second)
    clock.advance(1.0)                     # the third at 2.5 s, alone
    assert served.figures() == {"held": 1, "held_peak": 2}
    served.end(third)
    served.end(third)                      # ending twice changes nothing
    assert served.figures() == {"held": 0, "held_peak": 2}
