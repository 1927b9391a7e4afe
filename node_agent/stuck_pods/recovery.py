"""The thread that recovers pods stuck on image pulls (`--recover-stuck-pods`).

The worker hands over what each pass wrote (`credentials_applied`, never blocking). When a
registry's changes become effective (`decisions.registry_effective`: at once for a healthy
containerd restart, after kubelet's cache for config.json), a *window* opens for it and a
round runs: list this node's pods, and for each pod stuck on that registry evict it, tell it,
or report it (`decisions.decide`). A window stays open while evictions wait (for the budget,
or after a 429 with backoff), then for one follow-up round that reports replacements whose
pull failed again, and closes at the latest `give_up_after` after it opened: by then
kubelet's own back-off (at most 5 minutes) has retried every pull.

`run_due()` is one step on the injected clock; the thread only calls it and sleeps until the
next time it asks for. Tests call it directly with a clock they move.
"""

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from node_agent.backoff import Backoff
from node_agent.errors import unexpected
from node_agent.kube.errors import ApiError, EvictionRefused, ObjectMissing
from node_agent.kube.events import EventType, pod_event, utc_now
from node_agent.kube.model import ObjectRef, PodApi, RequestTimeout
from node_agent.metrics import AgentMetrics
from node_agent.stuck_pods.decisions import (
    EVICTION_WINDOW_SECONDS,
    AppliedChange,
    Effective,
    Memory,
    Recovery,
    budget_frees_at,
    evictions_allowed,
    recoveries,
    registry_effective,
    stuck_pod,
)

log = logging.getLogger(__name__)

RECOVERED = "ImagePullRecovered"
"""Normal Event on an evicted pod."""
CREDENTIALS_ON_NODE = "ImagePullCredentialsOnNode"
"""Warning Event on a stuck pod without a controller: delete it to retry now."""
FAILED_AGAIN = "ImagePullFailedAfterRecovery"
"""Warning Event on a replacement whose pull failed again: left to kubelet."""


WorkLeft = Literal["budget", "retry"]
"""Why a registry's window stays open after a round: evictions wait for the budget, or must
be asked for again (a 429, a failed call)."""


@dataclass(frozen=True)
class RecoveryTiming:
    """The recovery's intervals, in seconds."""

    retry_initial: float = 1.0
    """First delay after a refused (429) or failed eviction or pod list; doubles, jittered."""
    retry_max: float = 60.0
    follow_up: float = 60.0
    """After a window's last eviction: one more round to report replacements failing again."""
    give_up_after: float = 600.0
    """A window closes this long after its credentials became effective, work left or not."""
    request_timeout: RequestTimeout = (5.0, 30.0)


@dataclass
class _Window:
    """A registry whose credentials became effective: its pods are being recovered."""

    effective: Effective
    evicted: bool = False
    followed_up: bool = False


class StuckPodRecovery:
    """Evicts (or tells) the pods of one node stuck on registries whose credentials just
    became effective, at most `rate_per_minute` evictions a minute."""

    def __init__(
        self,
        *,
        api: PodApi,
        node: str,
        rate_per_minute: int,
        metrics: AgentMetrics,
        timing: RecoveryTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self._api = api
        self._node = node
        self._rate = rate_per_minute
        self._metrics = metrics
        self._timing = timing or RecoveryTiming()
        self._clock = clock
        self._wall_clock = wall_clock
        self._backoff = Backoff(
            initial=self._timing.retry_initial,
            maximum=self._timing.retry_max,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not cryptography
        )
        # Shared with the worker, under `_lock`:
        self._lock = threading.Lock()
        self._pending: dict[str, list[AppliedChange]] = {}
        # The recovery's own (one thread, or the test calling run_due):
        self._windows: dict[str, _Window] = {}
        self._retry_at: float | None = None
        self._attempts: deque[float] = deque()
        self._evicted: set[str] = set()
        self._told: set[str] = set()
        self._reported: set[str] = set()
        self._recovered: set[tuple[str, str]] = set()
        self._candidates: set[str] = set()
        # The thread:
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # the worker's side

    def credentials_applied(self, changes: Sequence[AppliedChange]) -> None:
        """What a pass wrote; returns at once."""
        if not changes:
            return
        with self._lock:
            for change in changes:
                self._pending.setdefault(change.registry, []).append(change)
        self._wake.set()

    # the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stuck-pods", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """End the thread (a round in progress finishes its current call); False if it was
        still busy at the timeout."""
        self._stopping.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before the step: a change handed over during it wakes us
            try:
                next_at = self.run_due()
            except Exception as error:  # a bug must not end recovery for good
                log.error("%s", unexpected(error, doing="recovering stuck pods"))
                next_at = self._clock() + self._timing.retry_max
            self._wake.wait(None if next_at is None else max(0.0, next_at - self._clock()))

    # one step

    def run_due(self) -> float | None:
        """Open the windows whose credentials are effective now, close expired ones, run a
        round if one is due; when the next step is due (None: nothing to wait for)."""
        now = self._clock()
        self._open_due_windows(now)
        self._close_expired_windows(now)
        if self._windows and (self._retry_at is None or self._retry_at <= now):
            self._retry_at = self._round(now)
        return self._next_step()

    def _open_due_windows(self, now: float) -> None:
        with self._lock:
            due = {
                registry: effect
                for registry, changes in self._pending.items()
                if (effect := registry_effective(changes)) is not None and effect.at <= now
            }
            for registry in due:
                del self._pending[registry]
        for registry, effect in sorted(due.items()):
            log.info(
                "stuck pods: credentials for %s are effective on this node (%s); looking for "
                "pods stuck pulling from it",
                registry,
                effect.why,
            )
            self._windows[registry] = _Window(effect)
            # New credentials: a controller recovered before gets another chance.
            self._recovered = {pair for pair in self._recovered if pair[1] != registry}
            self._retry_at = now

    def _close_expired_windows(self, now: float) -> None:
        for registry, window in list(self._windows.items()):
            if now - window.effective.at > self._timing.give_up_after:
                log.warning(
                    "stuck pods: stopped recovering pods stuck on %s after %.0fs; what is left "
                    "is kubelet's to retry",
                    registry,
                    self._timing.give_up_after,
                )
                del self._windows[registry]

    def _next_step(self) -> float | None:
        with self._lock:
            known = [registry_effective(changes) for changes in self._pending.values()]
        times = [effect.at for effect in known if effect is not None]
        if self._windows and self._retry_at is not None:
            times.append(self._retry_at)
        return min(times, default=None)

    # a round

    def _round(self, now: float) -> float | None:
        """One look at the node's pods for every open window; when the next round is due."""
        try:
            listing = self._api.list_pods_on_node(
                self._node, request_timeout=self._timing.request_timeout
            )
        except ApiError as error:
            delay = self._backoff.next_delay()
            log.warning("stuck pods: %s; retrying in %.1fs", error, delay)
            return now + delay
        pods = [pod for item in listing.items if (pod := stuck_pod(item, node=self._node))]
        chosen = recoveries(pods, self._windows.keys(), self._memory())
        self._candidates.update(r.pod.uid for r in chosen if r.action == "evict")
        waiting = self._act_on(chosen)
        return self._after_round(now, waiting)

    def _act_on(self, chosen: Sequence[Recovery]) -> dict[str, WorkLeft]:
        """Evict, tell or report each; the registries with work left, and why."""
        waiting: dict[str, WorkLeft] = {}
        for recovery in chosen:
            if recovery.action == "tell":
                self._tell(recovery)
            elif recovery.action == "report":
                self._report(recovery)
            elif not self._budget_left():
                waiting.setdefault(recovery.registry, "budget")
            elif not self._evict(recovery):
                waiting[recovery.registry] = "retry"
        return waiting

    def _after_round(self, now: float, waiting: dict[str, WorkLeft]) -> float | None:
        """Close the windows with nothing left to do (after their follow-up round); when the
        next round is due."""
        next_times: list[float] = []
        if "retry" in waiting.values():
            next_times.append(now + self._backoff.next_delay())
        else:
            self._backoff.reset()
        if "budget" in waiting.values():
            next_times.append(budget_frees_at(self._attempts, now=self._clock()))
        for registry, window in list(self._windows.items()):
            if registry in waiting:
                continue
            if window.evicted and not window.followed_up:
                window.followed_up = True
                next_times.append(now + self._timing.follow_up)
            else:
                del self._windows[registry]
        return min(next_times, default=None)

    def _memory(self) -> Memory:
        return Memory(
            evicted=self._evicted,
            told=self._told,
            reported=self._reported,
            recovered=self._recovered,
            candidates=self._candidates,
        )

    def _budget_left(self) -> bool:
        now = self._clock()
        while self._attempts and now - self._attempts[0] >= EVICTION_WINDOW_SECONDS:
            self._attempts.popleft()
        return evictions_allowed(self._attempts, now=now, per_minute=self._rate) > 0

    # what is done to a pod

    def _evict(self, recovery: Recovery) -> bool:
        """Ask for the eviction; False when it must be asked for again later."""
        pod = recovery.pod
        self._attempts.append(self._clock())
        try:
            self._api.evict_pod(
                ObjectRef(pod.namespace, pod.name), request_timeout=self._timing.request_timeout
            )
        except EvictionRefused:
            self._metrics.stuck_pods_recovered_total.labels(result="refused").inc()
            log.info("stuck pods: eviction of %s refused by a disruption budget; retrying", pod)
            return False
        except ObjectMissing:
            log.info("stuck pods: %s is gone already", pod)
            self._evicted.add(pod.uid)
            return True
        except ApiError as error:
            log.warning("stuck pods: could not evict %s: %s; retrying", pod, error)
            return False
        self._evicted_now(recovery)
        return True

    def _evicted_now(self, recovery: Recovery) -> None:
        pod, registry = recovery.pod, recovery.registry
        window = self._windows[registry]
        window.evicted = True
        self._evicted.add(pod.uid)
        if pod.controller_uid is not None:
            self._recovered.add((pod.controller_uid, registry))
        self._metrics.stuck_pods_recovered_total.labels(result="evicted").inc()
        why = window.effective.why
        log.info(
            "stuck pods: evicted %s (%s, %s) stuck pulling from %s: its credentials are "
            "effective on this node now (%s)",
            pod,
            pod.controller,
            _describe_containers(recovery),
            registry,
            why,
        )
        self._record(
            recovery,
            RECOVERED,
            f"evicted by node-agent on {self._node}: the credentials for {registry} are now "
            f"effective there ({why}); {pod.controller} creates a replacement whose pull "
            "starts at once instead of after kubelet's back-off",
            "Normal",
        )

    def _tell(self, recovery: Recovery) -> None:
        pod, registry = recovery.pod, recovery.registry
        self._told.add(pod.uid)
        self._metrics.stuck_pods_recovered_total.labels(result="skipped_unowned").inc()
        log.info(
            "stuck pods: %s (%s) is stuck pulling from %s, whose credentials are on this node "
            "now; it has no controller, so it is not deleted (Event %s)",
            pod,
            _describe_containers(recovery),
            registry,
            CREDENTIALS_ON_NODE,
        )
        self._record(
            recovery,
            CREDENTIALS_ON_NODE,
            f"the credentials for {registry} are now on node {self._node}; this pod has no "
            "controller, so node-agent does not delete it. Deleting it (and creating it "
            "again) retries the pull at once; otherwise kubelet retries after its back-off "
            "(up to 5 minutes)",
            "Warning",
        )

    def _report(self, recovery: Recovery) -> None:
        pod, registry = recovery.pod, recovery.registry
        self._reported.add(pod.uid)
        log.warning(
            "stuck pods: %s (%s) still fails to pull from %s after %s was recovered; left to "
            "kubelet: the credentials on the node may be wrong for this image",
            pod,
            _describe_containers(recovery),
            registry,
            pod.controller,
        )
        self._record(
            recovery,
            FAILED_AGAIN,
            f"the pull from {registry} failed again after node-agent evicted a pod of "
            f"{pod.controller}; not evicted again: kubelet keeps retrying. Check that the "
            "credentials for this registry are right for this image",
            "Warning",
        )

    def _record(self, recovery: Recovery, reason: str, message: str, type: EventType) -> None:
        pod = recovery.pod
        event = pod_event(
            ObjectRef(pod.namespace, pod.name),
            uid=pod.uid,
            reason=reason,
            message=message,
            type=type,
            node=self._node,
            at=self._wall_clock(),
        )
        try:
            self._api.create_event(
                pod.namespace, event, request_timeout=self._timing.request_timeout
            )
        except ApiError as error:
            log.warning("stuck pods: Event %s on %s not recorded: %s", reason, pod, error)


def _describe_containers(recovery: Recovery) -> str:
    return ", ".join(
        f"container {c.name} image {c.image}: {c.reason}" for c in recovery.pod.containers
    )
