"""At most one containerd restart attempt per `--min-reload-interval`.

The reconciler restarts containerd itself (and, when the restart fails, restores the old
config.toml and restarts again) and says so in its `Outcome`; the worker then closes the
`RestartGate` at the last attempt's time. A failed attempt closes it too: a config that
breaks containerd is retried at most once per interval, never in a loop.
"""

import time
from collections.abc import Callable


class RestartGate:
    """Open when the last restart attempt is at least `min_interval` seconds ago."""

    def __init__(self, *, min_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._min_interval = min_interval
        self._clock = clock
        self._last_attempt: float | None = None

    def is_open(self) -> bool:
        return self._last_attempt is None or self._clock() >= self.opens_at()

    def opens_at(self) -> float:
        """Monotonic time from which the next attempt is allowed."""
        if self._last_attempt is None:
            return -float("inf")
        return self._last_attempt + self._min_interval

    def record_attempt(self, *, at: float) -> None:
        """An attempt was made at monotonic time `at` (the same clock as this gate's)."""
        self._last_attempt = at
