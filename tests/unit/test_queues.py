"""ByteBoundedQueue: bounds in items and bytes, the four overflow policies, close()."""

from __future__ import annotations

import threading

import pytest

import connserver
from connserver.queues import ByteBoundedQueue, QueueClosed, QueueEmpty, QueueFull


def test_bounded_in_bytes_not_just_items():
    """A few large items fill the queue long before the item bound."""
    queue = ByteBoundedQueue(max_items=256, max_bytes=3000, policy="drop_newest")
    assert queue.put(b"x" * 1000) and queue.put(b"x" * 1000) and queue.put(b"x" * 1000)
    assert not queue.put(b"y")
    stats = queue.statistics()
    assert stats.items == 3 and stats.bytes == 3000 and stats.dropped == 1


def test_drop_oldest_evicts_from_the_front():
    """drop_oldest makes room by discarding the oldest items."""
    queue = ByteBoundedQueue(max_items=3, max_bytes=100, policy="drop_oldest")
    for item in (b"a", b"b", b"c", b"d"):
        assert queue.put(item)
    assert [queue.get_nowait() for _ in range(3)] == [b"b", b"c", b"d"]
    assert not queue.put(b"x" * 101)   # can never fit: dropped itself
    assert queue.statistics().dropped == 2


def test_disconnect_raises_slow_consumer_to_the_producer():
    """disconnect tells the producer this consumer is too slow; the queue is unchanged."""
    queue = ByteBoundedQueue(max_items=1, max_bytes=10, policy="disconnect")
    queue.put(b"a")
    with pytest.raises(connserver.SlowConsumer) as info:
        queue.put(b"b")
    assert info.value.close_reason is connserver.CloseReason.SLOW_CONSUMER
    assert len(queue) == 1


def test_block_waits_for_room_and_times_out():
    """block makes the producer wait for a consumer, up to its timeout."""
    queue = ByteBoundedQueue(max_items=1, max_bytes=10, policy="block")
    queue.put(b"a")
    with pytest.raises(QueueFull):
        queue.put_nowait(b"b")
    with pytest.raises(QueueFull):
        queue.put(b"b", timeout=0.01)
    consumer = threading.Thread(target=queue.get, args=(10,), name="test-consumer")
    started = threading.Event()
    result = []

    def producer():
        started.set()
        result.append(queue.put(b"b", timeout=10))

    thread = threading.Thread(target=producer, name="test-producer")
    thread.start()
    assert started.wait(10)
    consumer.start()
    thread.join(10)
    consumer.join(10)
    assert result == [True] and queue.get_nowait() == b"b"


def test_get_times_out_and_close_wakes_waiters():
    """get() raises QueueEmpty on timeout; close() wakes it with QueueClosed."""
    queue = ByteBoundedQueue(max_items=4, max_bytes=100)
    with pytest.raises(QueueEmpty):
        queue.get(timeout=0.01)
    errors = []

    def waiter():
        try:
            queue.get(timeout=10)
        except QueueClosed as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter, name="test-waiter")
    thread.start()
    queue.close()
    thread.join(10)
    assert not thread.is_alive() and len(errors) == 1
    with pytest.raises(QueueClosed):
        queue.put(b"late")


def test_items_queued_before_close_can_still_be_drained():
    """close() refuses new items but keeps the queued ones for the consumer."""
    queue = ByteBoundedQueue(max_items=10, max_bytes=100)
    for item in (b"a", b"bb", b"ccc"):
        queue.put(item)
    queue.close()
    assert queue.drain_nowait(3) == [b"a", b"bb"]
    assert queue.drain_nowait(1) == [b"ccc"]   # at least one item, even if larger
    with pytest.raises(QueueClosed):
        queue.get_nowait()


def test_messages_are_shared_not_copied():
    """The queue keeps the very object it was given (one bytes for every subscriber)."""
    message = b"m" * 1000
    queues = [ByteBoundedQueue(10, 10_000) for _ in range(3)]
    for queue in queues:
        queue.put(message)
    assert all(queue.get_nowait() is message for queue in queues)


@pytest.mark.parametrize("kwargs", [dict(max_items=0, max_bytes=1), dict(max_items=1, max_bytes=0),
                                    dict(max_items=1, max_bytes=1, policy="spill")])
def test_bad_parameters(kwargs):
    """Bounds must be positive and the policy known."""
    with pytest.raises(ValueError):
        ByteBoundedQueue(**kwargs)
