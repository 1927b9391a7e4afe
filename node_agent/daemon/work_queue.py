"""One queue, one worker: every reason to reconcile is a `Trigger` requested here, and the
worker takes them as one `Batch` per pass.

Timing: the first request after a quiet period is handed out at once; requests that
arrive while a pass runs, or within `debounce` after it ended, are collected and handed out
together `debounce` after that end. So one change costs no added delay and a burst costs a
handful of passes. Timed triggers (resync, a deferred containerd restart, a retry) become
requests when they are due and then follow the same rule.

The worker blocks on a condition variable; nothing here polls.
"""

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

TriggerKind = Literal["start", "resync", "source", "source-file", "node-file", "restart", "retry"]
"""Why a pass is wanted: start-up; the periodic resync; an API source changed; a source file's
directory changed; a node file's directory changed; the containerd restart interval passed;
a retry after a failed pass."""


@dataclass(frozen=True)
class Trigger:
    """One reason for a pass. Equal triggers requested repeatedly count once."""

    kind: TriggerKind
    detail: str = ""
    """Which source or node file, for logs and for the worker's checks."""

    def __str__(self) -> str:
        return f"{self.kind} {self.detail}".strip()


@dataclass(frozen=True)
class Batch:
    """Every trigger collected for one pass."""

    triggers: frozenset[Trigger]

    def only(self, *kinds: TriggerKind) -> bool:
        """True when every trigger is of one of `kinds`."""
        return all(trigger.kind in kinds for trigger in self.triggers)

    def __str__(self) -> str:
        return ", ".join(sorted(str(trigger) for trigger in self.triggers))


def next_run_at(
    *, has_requests: bool, scheduled: Iterable[float], last_finished: float | None, debounce: float
) -> float | None:
    """When the next batch may be handed out (monotonic seconds), None: nothing is wanted.

    Requests are wanted now, scheduled triggers at their time; either way not before
    `debounce` after the last pass ended.
    """
    wanted = -math.inf if has_requests else min(scheduled, default=None)
    if wanted is None:
        return None
    if last_finished is None:
        return wanted
    return max(wanted, last_finished + debounce)


class WorkQueue:
    """Thread-safe: `request`/`schedule` from any thread, `take`/`finished` from the worker."""

    def __init__(self, *, debounce: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._debounce = debounce
        self._clock = clock
        self._changed = threading.Condition()
        self._requests: set[Trigger] = set()
        self._scheduled: dict[Trigger, float] = {}
        self._last_finished: float | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, trigger: Trigger) -> None:
        """Ask for a pass as soon as the timing rule allows."""
        with self._changed:
            self._requests.add(trigger)
            self._changed.notify_all()

    def schedule(self, trigger: Trigger, *, at: float) -> None:
        """Ask for a pass at monotonic time `at`; an earlier schedule of the same trigger
        stays."""
        with self._changed:
            self._scheduled[trigger] = min(at, self._scheduled.get(trigger, math.inf))
            self._changed.notify_all()

    def take(self, *, timeout: float) -> Batch | None:
        """The next batch, waiting at most `timeout` seconds for it; None on timeout or once
        the queue is closed."""
        deadline = self._clock() + timeout
        with self._changed:
            while not self._closed:
                now = self._clock()
                run_at = self._next_run_at()
                if run_at is not None and run_at <= now:
                    return self._hand_out(now)
                wake_at = deadline if run_at is None else min(run_at, deadline)
                if wake_at <= now:
                    return None
                self._changed.wait(wake_at - now)
        return None

    def finished(self) -> None:
        """The worker ended a pass: requests from now on wait for the debounce."""
        with self._changed:
            self._last_finished = self._clock()

    def close(self) -> None:
        """Hand out nothing more; a waiting `take` returns None at once."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _next_run_at(self) -> float | None:
        return next_run_at(
            has_requests=bool(self._requests),
            scheduled=self._scheduled.values(),
            last_finished=self._last_finished,
            debounce=self._debounce,
        )

    def _hand_out(self, now: float) -> Batch:
        due = {trigger for trigger, at in self._scheduled.items() if at <= now}
        for trigger in due:
            del self._scheduled[trigger]
        batch = Batch(frozenset(self._requests | due))
        self._requests.clear()
        return batch
