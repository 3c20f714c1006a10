"""One bounded hand-off for every live queue: ``put`` never blocks, and what it drops is returned.

Live frames are newest-wins: when a frame queue is full the oldest waiting item makes room
(``drop="oldest"``). The event sink refuses the new item instead (``drop="newest"``): events
already queued keep their order and are all stored, the one that did not fit was never accepted.
Either way :meth:`BoundedQueue.put` returns the dropped item so that the caller counts it under its
own reason (memory never grows with load, and no drop is silent).

:meth:`BoundedQueue.close` ends the queue: later puts are refused (returned like a drop), readers
get what is still queued and then ``None``.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, Literal, TypeVar

T = TypeVar("T")


class BoundedQueue(Generic[T]):
    """A thread-safe FIFO of at most ``maxsize`` items; producers never wait. Items must not be None."""

    def __init__(self, maxsize: int, drop: Literal["oldest", "newest"] = "oldest") -> None:
        if maxsize < 1:
            raise ValueError(f"a bounded queue holds at least one item, not {maxsize}")
        self.maxsize = maxsize
        self.drop = drop
        self._items: deque[T] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.dropped = 0
        """items dropped to keep the bound so far (refusals after close are not counted)"""

    # -- producers ---------------------------------------------------------------------------------
    def put(self, item: T) -> T | None:
        """Add ``item`` without blocking; returns what was dropped instead, else None.

        That is the oldest item when a ``drop="oldest"`` queue is full, ``item`` itself when a
        ``drop="newest"`` queue is full or when the queue is closed.
        """
        with self._cond:
            if self._closed:
                return item
            evicted = None
            if len(self._items) >= self.maxsize:
                self.dropped += 1
                if self.drop == "newest":
                    return item
                evicted = self._items.popleft()
            self._items.append(item)
            self._cond.notify()
            return evicted

    def close(self) -> bool:
        """Refuse later puts and wake every reader; True for the call that closed it."""
        with self._cond:
            if self._closed:
                return False
            self._closed = True
            self._cond.notify_all()
            return True

    # -- consumers ---------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Wait until an item is queued or the queue is closed; True if an item is queued."""
        with self._cond:
            return self._wait(timeout)

    def get(self, timeout: float | None = None) -> T | None:
        """Remove and return the oldest item, waiting for one; None on timeout or once closed and empty."""
        with self._cond:
            return self._items.popleft() if self._wait(timeout) else None

    def peek(self, timeout: float | None = None) -> T | None:
        """The oldest item, left in place, waiting for one; None on timeout or once closed and empty."""
        with self._cond:
            return self._items[0] if self._wait(timeout) else None

    def pop_if_head(self, item: T) -> bool:
        """Remove ``item`` if it is still the oldest (after :meth:`peek`: an eviction may have taken it)."""
        with self._cond:
            if self._items and self._items[0] is item:
                self._items.popleft()
                return True
            return False

    def take(self, n: int = 1) -> list[T]:
        """Up to ``n`` of the oldest items, without waiting."""
        with self._cond:
            return [self._items.popleft() for _ in range(min(n, len(self._items)))]

    def drain(self) -> list[T]:
        """Every queued item, oldest first, without waiting."""
        with self._cond:
            out = list(self._items)
            self._items.clear()
            return out

    def _wait(self, timeout: float | None) -> bool:
        self._cond.wait_for(lambda: self._items or self._closed, timeout)
        return bool(self._items)

    # -- state -------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def exhausted(self) -> bool:
        """Closed and empty: nothing more will ever come out."""
        with self._cond:
            return self._closed and not self._items

    def __len__(self) -> int:
        return len(self._items)
