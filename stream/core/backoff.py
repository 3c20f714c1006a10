"""How long to wait before trying again: one capped exponential backoff for sources, outputs and sinks."""

from __future__ import annotations

import random
from typing import Protocol


class BackoffPolicy(Protocol):
    """What a reconnect setting says (``ReconnectConfig`` in the configuration is one)."""

    @property
    def initial_s(self) -> float: ...

    @property
    def max_s(self) -> float: ...

    @property
    def jitter(self) -> float: ...


class Backoff:
    """Capped exponential backoff with jitter: initial_s, 2x, 4x ... max_s seconds, each plus 0..jitter of it.

    The jitter keeps many streams that lost one server from all reconnecting in the same instant.
    The delay stops growing at ``max_s``, however long the outage lasts.
    """

    def __init__(self, initial_s: float, max_s: float, jitter: float = 0.0) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s (got {initial_s}, {max_s})")
        self.initial_s, self.max_s, self.jitter = initial_s, max_s, jitter
        self.attempt = 0
        """delays handed out since the last :meth:`reset`"""

    @classmethod
    def following(cls, policy: BackoffPolicy) -> Backoff:
        return cls(policy.initial_s, policy.max_s, policy.jitter)

    def next_delay(self) -> float:
        """The wait before the next attempt (each call counts as a failed attempt)."""
        base = self.initial_s
        for _ in range(self.attempt):  # doubled step by step: 2 ** attempt overflows a float in a long outage
            base *= 2
            if base >= self.max_s:
                break
        self.attempt += 1
        return min(base, self.max_s) * (1 + self.jitter * random.random())

    def reset(self) -> None:
        """An attempt worked: the next failure starts again at ``initial_s``."""
        self.attempt = 0
