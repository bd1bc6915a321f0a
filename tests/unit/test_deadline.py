"""Deadline arithmetic, with a fake clock (no sockets, no sleeps)."""

from connserver import Deadline
from connserver.testing import FakeClock


def test_remaining_counts_down_with_the_clock():
    """remaining() is what is left of an absolute deadline, not a fresh timeout."""
    clock = FakeClock()
    deadline = Deadline(10.0, clock)
    clock.advance(3.0)
    assert deadline.remaining() == 7.0
    clock.advance(7.5)
    assert deadline.expired()
    assert deadline.remaining() == -0.5


def test_none_never_expires():
    """Deadline(None) is an explicit 'no limit'."""
    clock = FakeClock()
    deadline = Deadline(None, clock)
    clock.advance(1e9)
    assert deadline.remaining() is None
    assert not deadline.expired()


def test_narrowed_takes_the_earlier_deadline():
    """Narrowing can shorten a deadline but never extend it."""
    clock = FakeClock()
    outer = Deadline(5.0, clock)
    assert outer.narrowed(10.0) is outer
    inner = outer.narrowed(2.0)
    assert inner.remaining() == 2.0
    assert Deadline(None, clock).narrowed(1.0).remaining() == 1.0
