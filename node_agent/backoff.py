"""Retry delays: exponential backoff with full jitter, reset by a success. Pure (the random
source is passed in)."""

import random


class Backoff:
    """Exponential backoff with full jitter: failure n waits uniform(0, min(max, initial·2ⁿ⁻¹)).

    Full jitter spreads the retries of many nodes after an API outage.
    """

    def __init__(self, *, initial: float, maximum: float, rng: random.Random) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * 2 ** min(self._failures, 62))
        self._failures += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self._failures = 0
