"""`RestartSlots`: one thread that gets, keeps and gives back this node's restart slot.

The worker asks (`request`) when containerd's config needs a restart, learns from
`may_restart` whether it may go ahead, and says what its pass did (`pass_done`). Everything
that talks to the API happens on this module's own thread, so a slow or absent API never
blocks a reconcile, and the slot's Lease is renewed every TTL/3 while the worker restarts
containerd.

The slot's states and what moves it between them are `machine.transition` (pure, and drawn
in docs/restart-slots.md); this module feeds it events and carries out
its actions: the API calls of seeking a slot (list, claim, watch) and of holding one (renew,
release), on the thread.
"""

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from node_agent.backoff import Backoff
from node_agent.kube.errors import (
    ApiConflict,
    ApiError,
    ObjectMissing,
    WatchExpired,
)
from node_agent.kube.model import EventStream, LeaseApi, ObjectRef, RequestTimeout
from node_agent.restart_slots.leases import (
    Claim,
    NoSlot,
    QuietTimer,
    SlotLease,
    choose_slot,
    claimed,
    new_lease,
    node_fraction,
    released,
    renewed,
    slot_leases,
    slot_order,
)
from node_agent.restart_slots.machine import (
    HOLDS_LEASE,
    MAY_RESTART,
    Action,
    ApiGaveUp,
    Event,
    GivenBack,
    Granted,
    PassDone,
    Requested,
    Slot,
    SlotState,
    transition,
)

log = logging.getLogger(__name__)


# Stopping: the release must fit in the daemon's stop budget.
_FINAL_TIMEOUT: RequestTimeout = (1.0, 2.0)



class SlotReporter(Protocol):
    """Where the slot's story goes (metrics, Node Events, log)."""

    def restart_queued(self, *, slots: int, namespace: str) -> None: ...

    def restart_wait_over(self) -> None:
        """The wait ended without a slot being needed any more (or the agent stopped)."""

    def restart_slot_acquired(self, slot: str, *, waited: float) -> None: ...

    def restart_failed_open(self, *, unreachable_for: float, problem: str) -> None: ...

    def restart_slot_kept(self, slot: str, *, namespace: str) -> None: ...

    def restart_slot_released(self, slot: str) -> None: ...

    def restart_slot_lost(self, slot: str, *, holder: str | None) -> None: ...


@dataclass(frozen=True)
class SlotConfig:
    """The coordination settings, resolved."""

    node: str
    namespace: str
    concurrency: int
    lease_ttl: float
    max_wait: float
    settle: float

    @property
    def lease_seconds(self) -> int:
        """`leaseDurationSeconds` (whole seconds, rounded up)."""
        return max(1, math.ceil(self.lease_ttl))

    @property
    def renew_every(self) -> float:
        return self.lease_seconds / 3


@dataclass(frozen=True)
class SlotTiming:
    """Delays of the slot thread, in seconds. The defaults suit a real cluster."""

    start_jitter: float = 2.0
    """A wait starts after uniform(0, start_jitter): nodes that saw the same Secret change
    in the same second do not all ask the API at once."""
    longest_watch: float = 30.0
    """The slow poll: a Lease watch is reopened (after a fresh list) at least this often."""
    claim_spread: float = 0.1
    """A freed slot seen on the watch is claimed after uniform(0, claim_spread): among many
    waiting nodes the first wins within milliseconds, and the others see it and stay quiet."""
    conflict_backoff: float = 0.1
    """After a 409, wait uniform(0, this) before reading the slots again: long enough to
    spread the nodes that lost the same race, short enough not to leave a slot idle."""
    retry_initial: float = 1.0
    retry_max: float = 30.0
    """Backoff between attempts while the API fails."""
    renew_retry: float = 1.0
    """After a failed renewal or release, try again this soon."""
    connect_timeout: float = 5.0
    read_timeout: float = 10.0


class _FreedSlotRace:
    """Every waiting node sees a freed slot at the same moment. Each claims one only after a
    random head start, and not a slot the watch shows someone else took meanwhile: the
    earliest node wins, the others stay quiet instead of each sending an update that would
    get a 409 (a release would otherwise cost one request per waiting node)."""

    def __init__(self, stream: EventStream, *, head_start: float) -> None:
        self._stream = stream
        self._head_start = head_start
        self._timer: threading.Timer | None = None
        self._freed: dict[str, Claim] = {}

    @property
    def claim(self) -> Claim | None:
        """The slot to claim: the first freed one nobody has taken since."""
        return next(iter(self._freed.values()), None)

    def freed(self, claim: Claim) -> None:
        self._freed[claim.slot] = claim
        if self._timer is None:
            # Ends the stream's blocked read when the head start is over: then claim.
            self._timer = threading.Timer(self._head_start, self._stream.interrupt)
            self._timer.daemon = True
            self._timer.start()

    def taken(self, slot: str) -> None:
        self._freed.pop(slot, None)
        if not self._freed:
            self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RestartSlots:
    """This node's restart slot. `start()`, then the worker's calls; `stop()` at the end."""

    def __init__(
        self,
        *,
        api: LeaseApi,
        config: SlotConfig,
        reporter: SlotReporter,
        on_granted: Callable[[], None],
        timing: SlotTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._api = api
        self._reporter = reporter
        self._on_granted = on_granted
        self._timing = timing or SlotTiming()
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._order = slot_order(config.node, config.concurrency)
        self._quiet = QuietTimer()
        self._backoff = Backoff(
            initial=self._timing.retry_initial, maximum=self._timing.retry_max, rng=self._rng
        )
        self._changed = threading.Condition()
        self._slot = Slot()
        self._stopped = False
        self._held: SlotLease | None = None
        self._renew_at = 0.0
        self._renewed_at = 0.0
        self._wait_started = 0.0
        self._not_before = 0.0
        self._unreachable_since: float | None = None
        self._failed_slots: set[str] = set()
        self._stream_interrupt: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="restart-slots", daemon=True)

    # lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> bool:
        """End the thread; a slot held for a healthy or unneeded restart is given back, a
        kept one stays kept. True if the thread ended within `timeout`."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
            self._interrupt_watch()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def state(self) -> SlotState:
        with self._changed:
            return self._slot.state

    @property
    def held_slot(self) -> str | None:
        with self._changed:
            return self._held.name if self._held is not None else None

    # the worker's side

    def may_restart(self) -> bool:
        """Whether containerd may be restarted now: a slot is held (or the API has been
        unreachable for longer than max-wait)."""
        with self._changed:
            return self._slot.state in MAY_RESTART

    def request(self) -> None:
        """containerd's config needs a restart: get a slot (`on_granted` is called then)."""
        self._handle(Requested())

    def pass_done(self, *, restart: str | None, containerd_in_sync: bool, failed: bool) -> None:
        """What a pass did: `restart` is its restart result (`success`, `rolled_back`,
        `failed`) or None; `containerd_in_sync` whether containerd runs the desired config;
        `failed` whether the pass ended in an error."""
        self._handle(
            PassDone(
                restart,
                in_sync=containerd_in_sync,
                failed=failed,
                now=self._clock(),
                settle=self.config.settle,
            )
        )

    # the state machine

    def _handle(self, event: Event) -> None:
        """Move the slot on `event` and carry out the actions (reports and the grant outside
        the lock: they call other parts of the agent)."""
        with self._changed:
            actions = self._transition(event)
        self._carry_out(actions)

    def _transition(self, event: Event) -> tuple[Action, ...]:
        """The state change itself; call with the lock held."""
        self._slot, actions = transition(self._slot, event)
        if Action.BEGIN_WAIT in actions:
            now = self._clock()
            self._wait_started = now
            self._not_before = now + self._rng.uniform(0, self._timing.start_jitter)
            self._unreachable_since = None
        if Action.END_WAIT in actions:
            self._interrupt_watch()
        self._changed.notify_all()
        return actions

    def _carry_out(self, actions: tuple[Action, ...]) -> None:
        config = self.config
        for action in actions:
            if action is Action.BEGIN_WAIT:
                self._reporter.restart_queued(slots=config.concurrency, namespace=config.namespace)
            elif action is Action.END_WAIT:
                self._reporter.restart_wait_over()
            elif action is Action.REPORT_KEPT:
                held = self._held
                assert held is not None, "a kept slot has a Lease"
                self._reporter.restart_slot_kept(held.name, namespace=config.namespace)
            elif action is Action.GRANT:
                self._on_granted()

    # the thread

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._stopped:
                    break
                state = self._slot.state
                if state not in HOLDS_LEASE and state is not SlotState.WAITING:
                    self._changed.wait()
                    continue
            if state is SlotState.WAITING:
                self._try_to_acquire()
            else:
                self._keep_or_release()
        self._on_exit()

    def _on_exit(self) -> None:
        with self._changed:
            state = self._slot.state
        if state is SlotState.WAITING:
            self._reporter.restart_wait_over()
        elif state in (SlotState.HOLDING, SlotState.SETTLING):
            self._release(final=True)

    # waiting for a slot

    def _try_to_acquire(self) -> None:
        delay = self._not_before - self._clock()
        if delay > 0:
            self._pause(delay, SlotState.WAITING)
            return
        try:
            listing = self._api.list_leases(self.config.namespace, request_timeout=self._timeout())
        except ApiError as error:
            self._api_failed(error)
            return
        leases = slot_leases(listing.items, self._order)
        now = self._clock()
        self._quiet.observe(leases, now)
        # A slot whose claim failed (403 on one name, say) is tried last, so the others
        # still serve; the API counts as answering only once a claim or a wait works.
        order = sorted(self._order, key=lambda slot: slot in self._failed_slots)
        choice = choose_slot(
            node=self.config.node,
            order=order,
            leases=leases,
            quiet=self._quiet,
            now=now,
            default_ttl=self.config.lease_seconds,
        )
        if isinstance(choice, NoSlot):
            self._api_answered()  # every slot is held: a normal wait
            freed = self._watch_slots(listing.resource_version, choice.retry_in, leases)
            if freed is not None:
                self._claim(freed)
        else:
            self._claim(choice)

    def _claim(self, claim: Claim) -> None:
        try:
            answer = self._send_claim(claim)
        except (ApiConflict, ObjectMissing) as error:
            log.debug("restart slot %s: someone was faster (%s)", claim.slot, error)
            self._pause(self._rng.uniform(0, self._timing.conflict_backoff), SlotState.WAITING)
            return
        except ApiError as error:
            self._failed_slots.add(claim.slot)
            self._api_failed(error)
            return
        self._api_answered()
        lease = SlotLease.parse(answer)
        if lease is None:
            log.warning("restart slot %s: the API answered an unusable Lease", claim.slot)
            self._pause(self._timing.renew_retry, SlotState.WAITING)
            return
        self._granted(lease)

    def _send_claim(self, claim: Claim) -> Any:
        at, config = self._wall_clock(), self.config
        if claim.kind == "create":
            body = new_lease(claim.slot, node=config.node, ttl=config.lease_seconds, at=at)
            return self._api.create_lease(config.namespace, body, request_timeout=self._timeout())
        assert claim.lease is not None, "take and reclaim carry the Lease read"
        body = claimed(claim.lease, node=config.node, ttl=config.lease_seconds, at=at)
        return self._api.replace_lease(self._ref(claim.slot), body, request_timeout=self._timeout())

    def _granted(self, lease: SlotLease) -> None:
        with self._changed:
            now = self._clock()
            self._held = lease
            self._renewed_at = now
            self._renew_at = now + self.config.renew_every
            actions = self._transition(Granted(now, stopping=self._stopped))
            waited = now - self._wait_started
        if Action.REPORT_ACQUIRED in actions:
            log.info("restart slot %s acquired after %.1fs", lease.name, waited)
            self._reporter.restart_slot_acquired(lease.name, waited=waited)
        self._carry_out(actions)

    def _watch_slots(
        self, resource_version: str, retry_in: float, leases: dict[str, SlotLease]
    ) -> Claim | None:
        """Wait until a slot is freed (the claim to make at once), or until one may have been
        abandoned, its holder changed, the watch failed or `longest_watch` passed (None: list
        again). Renewals only restart their slot's quiet time: waiting nodes stay asleep."""
        seconds = max(1, math.ceil(min(retry_in, self._timing.longest_watch)))
        try:
            stream = self._api.watch_leases(
                self.config.namespace,
                resource_version=resource_version,
                timeout_seconds=seconds,
                request_timeout=(self._timing.connect_timeout, seconds + self._timing.read_timeout),
            )
        except WatchExpired:
            return None
        except ApiError as error:
            self._api_failed(error)
            return None
        with self._changed:
            if self._slot.state is not SlotState.WAITING or self._stopped:
                stream.close()
                return None
            self._stream_interrupt = stream.interrupt
        race = _FreedSlotRace(stream, head_start=self._rng.uniform(0, self._timing.claim_spread))
        try:
            self._follow(stream, leases, race)
        except (ApiError, WatchExpired) as error:
            if race.claim is None:
                log.debug("restart slots: watch ended (%s); listing again", error)
        finally:
            race.cancel()
            with self._changed:
                self._stream_interrupt = None
            stream.close()
        return race.claim

    def _follow(
        self, stream: EventStream, leases: dict[str, SlotLease], race: "_FreedSlotRace"
    ) -> None:
        """Read slot changes until the stream ends (by the server, or by `race`)."""
        for event in stream:
            if event.name not in leases or event.type == "BOOKMARK":
                continue
            if event.type == "DELETED":
                race.freed(Claim("create", event.name))
                continue
            lease = SlotLease.parse(event.object)
            if lease is None:
                continue
            if lease.holder is None:
                race.freed(Claim("take", lease.name, lease))
                continue
            race.taken(lease.name)
            leases[lease.name] = lease
            self._quiet.observe_one(lease, self._clock())

    def _api_failed(self, error: ApiError) -> None:
        now = self._clock()
        if self._unreachable_since is None:
            self._unreachable_since = now
            log.warning("restart slots: %s; retrying, containerd restart waits", error)
        else:
            log.debug("restart slots: %s", error)
        spread = node_fraction(self.config.node) * self.config.lease_ttl
        fail_open_at = self._unreachable_since + self.config.max_wait + spread
        if now >= fail_open_at:
            self._fail_open(now - self._unreachable_since, str(error))
            return
        self._pause(min(self._backoff.next_delay(), fail_open_at - now), SlotState.WAITING)

    def _api_answered(self) -> None:
        self._unreachable_since = None
        self._backoff.reset()
        self._failed_slots.clear()

    def _fail_open(self, unreachable_for: float, problem: str) -> None:
        with self._changed:
            actions = self._transition(ApiGaveUp())
        if Action.REPORT_FAILED_OPEN not in actions:
            return
        log.warning(
            "restart slots: the API has been unreachable for %.0fs (over --restart-max-wait): "
            "restarting containerd without a slot (%s)",
            unreachable_for,
            problem,
        )
        self._reporter.restart_failed_open(unreachable_for=unreachable_for, problem=problem)
        self._carry_out(actions)

    # holding a slot

    def _keep_or_release(self) -> None:
        with self._changed:
            now = self._clock()
            releasing = self._slot.state is SlotState.SETTLING
            release_at = self._slot.release_at
            if releasing and now >= release_at:
                due = "release"
            elif now >= self._renew_at:
                due = "renew"
            else:
                until = min(self._renew_at, release_at if releasing else math.inf)
                self._changed.wait(until - now)
                return
        if due == "release":
            self._release(final=False)
        else:
            self._renew()

    def _renew(self) -> None:
        held = self._held
        assert held is not None, "a holding state has a Lease"
        try:
            answer = self._api.replace_lease(
                self._ref(held.name),
                renewed(held, at=self._wall_clock()),
                request_timeout=self._timeout(),
            )
        except (ApiConflict, ObjectMissing):
            self._reread_held(held.name)
            return
        except ApiError as error:
            log.warning("restart slot %s: renewal failed (%s); retrying", held.name, error)
            with self._changed:
                self._renew_at = self._clock() + self._timing.renew_retry
            return
        self._store_renewed(SlotLease.parse(answer))

    def _store_renewed(self, lease: SlotLease | None) -> None:
        with self._changed:
            now = self._clock()
            if lease is not None:
                self._held = lease
                self._renewed_at = now
            self._renew_at = now + self.config.renew_every

    def _reread_held(self, name: str) -> None:
        """A renewal met a 409 or 404: still ours (someone edited the Lease), or lost?"""
        try:
            listing = self._api.list_leases(self.config.namespace, request_timeout=self._timeout())
        except ApiError as error:
            log.warning("restart slot %s: cannot read it back (%s); retrying", name, error)
            with self._changed:
                self._renew_at = self._clock() + self._timing.renew_retry
            return
        lease = slot_leases(listing.items, [name]).get(name)
        if lease is not None and lease.holder == self.config.node:
            with self._changed:
                self._held = lease
                self._renew_at = self._clock()
            return
        self._lost(name, lease.holder if lease is not None else None)

    def _lost(self, name: str, holder: str | None) -> None:
        log.warning(
            "restart slot %s was released or taken by someone else (holder now: %s)",
            name,
            holder or "none",
        )
        self._after_release()
        self._reporter.restart_slot_lost(name, holder=holder)

    def _release(self, *, final: bool) -> None:
        held = self._held
        assert held is not None, "a holding state has a Lease"
        timeout = _FINAL_TIMEOUT if final else self._timeout()
        try:
            self._api.replace_lease(self._ref(held.name), released(held), request_timeout=timeout)
        except ObjectMissing:
            pass  # deleted: free
        except (ApiConflict, ApiError) as error:
            if final or self._clock() >= self._renewed_at + self.config.lease_ttl:
                log.warning("restart slot %s: not released (%s); it expires", held.name, error)
                self._after_release()
                return
            if isinstance(error, ApiConflict):
                self._reread_held(held.name)  # still ours: released on the next turn
                return
            log.warning("restart slot %s: release failed (%s); retrying", held.name, error)
            with self._changed:
                retry_at = self._clock() + self._timing.renew_retry
                self._slot = replace(self._slot, release_at=retry_at)
            return
        log.info("restart slot %s released", held.name)
        self._after_release()
        self._reporter.restart_slot_released(held.name)

    def _after_release(self) -> None:
        with self._changed:
            self._held = None
            actions = self._transition(GivenBack(stopping=self._stopped))
        self._carry_out(actions)

    # helpers

    def _pause(self, seconds: float, state: SlotState) -> None:
        """Wait up to `seconds`, less if the state changes or the slots are stopped."""
        with self._changed:
            if self._slot.state is state and not self._stopped and seconds > 0:
                self._changed.wait(seconds)

    def _interrupt_watch(self) -> None:
        if self._stream_interrupt is not None:
            self._stream_interrupt()

    def _ref(self, slot: str) -> ObjectRef:
        return ObjectRef(self.config.namespace, slot)

    def _timeout(self) -> RequestTimeout:
        return (self._timing.connect_timeout, self._timing.read_timeout)
