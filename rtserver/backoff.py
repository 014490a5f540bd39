"""Retry delays: exponential backoff with full jitter.

``delay = uniform(0, min(cap, base * 2**attempt))`` (the "Full Jitter" of AWS's
"Exponential Backoff And Jitter"), so many clients or writers that failed
together do not retry together.
"""

from __future__ import annotations

import random


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based)."""
    ceiling = min(cap, base * (2 ** min(attempt, 32)))
    return (rng or random).uniform(0, ceiling)


class Backoff:
    """Successive full-jitter delays; ``reset()`` after a success."""

    def __init__(
        self, base: float = 0.1, cap: float = 10.0, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng

    def next_delay(self) -> float:
        delay = full_jitter(self.attempt, self.base, self.cap, self._rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
