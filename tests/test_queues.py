"""The one bounded queue behind every live hand-off (frames to the batcher, to the redaction stage, to an
output; events to their sink) and the one reconnect backoff."""

from __future__ import annotations

import threading

import pytest

from stream.core.backoff import Backoff
from stream.core.queues import BoundedQueue


def test_a_full_frame_queue_drops_the_oldest_and_returns_it():
    q: BoundedQueue[int] = BoundedQueue(2)
    assert q.put(1) is None and q.put(2) is None
    assert q.put(3) == 1, "the oldest waiting item makes room"
    assert q.put(4) == 2
    assert q.dropped == 2 and len(q) == 2
    assert q.take(5) == [3, 4]


def test_a_full_event_queue_refuses_the_newest_and_keeps_the_order():
    q: BoundedQueue[str] = BoundedQueue(2, drop="newest")
    q.put("a")
    q.put("b")
    assert q.put("c") == "c", "the item that did not fit is handed back"
    assert q.dropped == 1
    assert q.drain() == ["a", "b"]
    assert q.put("d") is None, "room again once drained"


def test_close_refuses_later_puts_and_readers_get_the_rest_then_none():
    q: BoundedQueue[int] = BoundedQueue(4)
    q.put(1)
    q.put(2)
    assert q.close() is True and q.close() is False, "only the first close closes"
    assert q.put(3) == 3 and q.dropped == 0, "a refusal after close is not a drop to keep the bound"
    assert not q.exhausted
    assert q.get() == 1 and q.get() == 2
    assert q.get() is None and q.peek() is None and q.exhausted


def test_get_and_peek_time_out_on_an_empty_queue():
    q: BoundedQueue[int] = BoundedQueue(1)
    assert q.get(timeout=0.01) is None
    assert q.peek(timeout=0.01) is None
    assert q.wait(timeout=0.01) is False


def test_a_waiting_reader_wakes_for_a_put_from_another_thread():
    q: BoundedQueue[int] = BoundedQueue(1)
    got: list[int | None] = []
    reader = threading.Thread(target=lambda: got.append(q.get()))
    reader.start()
    q.put(7)
    reader.join(5)
    assert got == [7]


def test_a_waiting_reader_wakes_when_the_queue_closes():
    q: BoundedQueue[int] = BoundedQueue(1)
    got: list[int | None] = []
    reader = threading.Thread(target=lambda: got.append(q.peek()))
    reader.start()
    q.close()
    reader.join(5)
    assert not reader.is_alive() and got == [None]


def test_pop_if_head_leaves_an_item_an_eviction_took_meanwhile():
    """The redaction stage peeks at its oldest frame, waits for its detections, then removes it; if the
    backlog evicted that frame meanwhile, the new oldest must stay."""
    q: BoundedQueue[object] = BoundedQueue(1)
    first, second = object(), object()
    q.put(first)
    assert q.peek() is first
    assert q.put(second) is first
    assert q.pop_if_head(first) is False
    assert q.peek() is second and q.pop_if_head(second) is True and len(q) == 0


def test_many_producers_never_exceed_the_bound_and_every_item_is_counted():
    q: BoundedQueue[int] = BoundedQueue(8)
    taken: list[int] = []

    def consume() -> None:
        while (item := q.get()) is not None:
            taken.append(item)

    dropped: list[int] = []
    sizes: list[int] = []

    def produce(base: int) -> None:
        for i in range(2000):
            out = q.put(base + i)
            if out is not None:
                dropped.append(out)
            sizes.append(len(q))

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(k * 10_000,)) for k in range(4)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    q.close()
    consumer.join(10)
    assert not consumer.is_alive()
    assert max(sizes) <= 8, "memory never grows with load"
    assert len(taken) + len(dropped) == 8000 and q.dropped == len(dropped)
    assert len(set(taken) | set(dropped)) == 8000, "each item is either taken or handed back, once"


def test_maxsize_must_hold_an_item():
    with pytest.raises(ValueError, match="at least one item"):
        BoundedQueue(0)


def test_backoff_doubles_up_to_its_cap_and_starts_again_after_reset():
    b = Backoff(0.5, 4.0)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_backoff_jitter_adds_up_to_its_share():
    b = Backoff(1.0, 1.0, jitter=0.2)
    delays = [b.next_delay() for _ in range(200)]
    assert all(1.0 <= d <= 1.2 for d in delays)
    assert max(delays) > min(delays), "jitter spreads reconnects of many streams"


def test_backoff_survives_an_outage_of_any_length():
    """A camera that is down for days retries thousands of times; the delay stays at its cap."""
    b = Backoff(0.5, 10.0)
    b.attempt = 5000
    assert b.next_delay() == 10.0


def test_backoff_follows_a_reconnect_setting():
    from stream.config import RtspSourceConfig

    src = RtspSourceConfig(type="rtsp", url="rtsp://cam.example/stream",
                           reconnect={"initial_s": 0.25, "max_s": 2, "jitter": 0})
    b = Backoff.following(src.reconnect)
    assert [b.next_delay() for _ in range(5)] == [0.25, 0.5, 1.0, 2.0, 2.0]


@pytest.mark.parametrize(("initial", "cap"), [(0, 1), (2, 1), (-1, 1)])
def test_backoff_refuses_settings_that_cannot_work(initial, cap):
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        Backoff(initial, cap)

