"""containerd restarts in the daemon: at most one attempt per `--min-reload-interval`, and
what each pass's attempts amounted to.

The reconciler restarts containerd itself (and, when the restart fails, restores the old
config.toml and restarts again). `RecordingRestart` sits between the reconciler and the real
restart, so the daemon learns the outcome without parsing messages, and every attempt — a
failed one too — closes the `RestartGate`: a config that breaks containerd is retried at most
once per interval, never in a loop.
"""

import time
from collections.abc import Callable, Sequence
from typing import Literal

from node_agent.errors import ReloadFailed
from node_agent.reconcile import ContainerdReload

RestartResult = Literal["success", "rolled_back", "failed"]
"""The `result` label of `node_agent_containerd_restarts_total`."""


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

    def record_attempt(self) -> None:
        self._last_attempt = self._clock()


def restart_result(attempts: Sequence[bool]) -> RestartResult | None:
    """What one pass's restart attempts (True: containerd answered CRI) amount to: the
    reconciler restarts once, and once more after rolling config.toml back."""
    if not attempts:
        return None
    if attempts[0]:
        return "success"
    return "rolled_back" if len(attempts) > 1 and attempts[-1] else "failed"


class RecordingRestart:
    """`ContainerdReload` that closes the gate and remembers the result of every attempt."""

    def __init__(self, inner: ContainerdReload, gate: RestartGate) -> None:
        self._inner = inner
        self._gate = gate
        self._attempts: list[bool] = []

    def restart_and_verify(self) -> None:
        self._gate.record_attempt()
        try:
            self._inner.restart_and_verify()
        except ReloadFailed:
            self._attempts.append(False)
            raise
        self._attempts.append(True)

    def take_result(self) -> RestartResult | None:
        """The result of the attempts since the last call (None: no attempt)."""
        attempts, self._attempts = self._attempts, []
        return restart_result(attempts)
