"""Refused logins per address: past a limit, an address is told to wait instead of being answered.

Guessing tokens costs a caller nothing but costs the server a PBKDF2 hash and an audit line per
guess; a flood would grow the audit log without bound. After ``limit`` refused logins from one
address within ``window_s`` seconds, that address gets ``429`` with ``Retry-After`` until the
window has passed, unless its token was verified before (an operator behind the same NAT keeps
working; checking a known token costs no hashing). The first ``429`` of a spell is audited, the
rest are only counted. A successful login never resets the count (a valid token does not license
guessing others).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

LIMIT = 20
"""refused logins per address and window before it must wait"""
WINDOW_S = 60.0
MAX_ADDRESSES = 10_000
"""addresses remembered; the least recently refused are forgotten first (memory stays bounded)"""


class LoginThrottle:
    def __init__(self, limit: int = LIMIT, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._told: set[str] = set()
        self._lock = threading.Lock()
        self.throttled = 0
        """requests answered 429 so far"""

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.get(address)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            self._told.discard(address)
        return times

    def wait_s(self, address: str | None) -> float | None:
        """Seconds ``address`` must wait before it may try again; None when it may try now."""
        if address is None:
            return None
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            if len(times) < self.limit:
                return None
            self.throttled += 1
            return max(1.0, times[0] + self.window_s - now)

    def first_wait(self, address: str) -> bool:
        """True once per throttled spell of ``address``: the one refusal worth an audit line."""
        with self._lock:
            if address in self._told:
                return False
            self._told.add(address)
            return True

    def refused(self, address: str | None) -> None:
        """Count a refused login from ``address``."""
        if address is None:
            return
        with self._lock:
            now = self.clock()
            times = self._failures.pop(address, None) or deque()
            times.append(now)
            self._failures[address] = times  # most recent last
            while len(self._failures) > MAX_ADDRESSES:
                old, _ = self._failures.popitem(last=False)
                self._told.discard(old)
