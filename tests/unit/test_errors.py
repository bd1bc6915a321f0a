"""The exception tree promised in DESIGN.md."""

import pytest

import connserver
from connserver import CloseReason


def test_cancelled_is_not_an_exception():
    """`except Exception:` in a handler cannot swallow a cancellation."""
    assert issubclass(connserver.Cancelled, BaseException)
    assert not issubclass(connserver.Cancelled, Exception)
    with pytest.raises(connserver.Cancelled):
        try:
            raise connserver.Cancelled("shutdown")
        except Exception:  # pragma: no cover - must not catch
            pytest.fail("Cancelled was caught by except Exception")


def test_deadline_exceeded_is_a_timeout_error_with_a_phase():
    """DeadlineExceeded is also TimeoutError and maps its phase to a close reason."""
    error = connserver.DeadlineExceeded("read", 30.0)
    assert isinstance(error, TimeoutError)
    assert isinstance(error, connserver.ConnServerError)
    assert error.close_reason is CloseReason.READ_DEADLINE
    assert connserver.DeadlineExceeded("idle").close_reason is CloseReason.IDLE
    assert connserver.DeadlineExceeded("write").close_reason is CloseReason.WRITE_DEADLINE
    assert "read deadline exceeded (30 s)" == str(error)


def test_protocol_errors_split_by_fault():
    """The peer's fault and ours are different classes with different reasons."""
    assert issubclass(connserver.RemoteProtocolError, connserver.ProtocolError)
    assert issubclass(connserver.LocalProtocolError, connserver.ProtocolError)
    assert connserver.RemoteProtocolError("x").close_reason is CloseReason.PROTOCOL_ERROR
    assert connserver.FrameTooLarge(10, 5).close_reason is CloseReason.FRAME_TOO_LARGE
    assert str(connserver.FrameTooLarge(10, 5)) == "frame of 10 bytes exceeds the limit of 5 bytes"


def test_connection_broken_is_a_connection_error():
    """A reset surfaces as ConnectionBroken, which is also a ConnectionError."""
    error = connserver.ConnectionBroken("reset", 104)
    assert isinstance(error, ConnectionError)
    assert error.close_reason is CloseReason.RESET


def test_config_error_names_the_field():
    """ConfigError says which setting was wrong."""
    error = connserver.ConfigError("idle_timeout", "must be greater than 0")
    assert error.field == "idle_timeout"
    assert "idle_timeout" in str(error)
    assert isinstance(error, ValueError)
