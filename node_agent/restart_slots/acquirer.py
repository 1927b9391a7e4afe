"""`SlotAcquirer`: the API side of waiting for a slot, one attempt at a time.

An attempt lists the slot Leases and claims the one `leases.choose_slot` picks: it creates a
missing Lease (a 409 means another node won), takes a free one or one abandoned by its
holder with an update carrying the resourceVersion it read (so only one node wins), or
reclaims one this node already holds. When every slot is held and renewed, it watches the
slots instead: renewals only restart a slot's quiet time, and a slot freed on the watch is
claimed after a random head start. What an attempt came to (`Claimed`, `Retry`, `GaveUp`)
is for `RestartSlots` to feed to the state machine; the acquirer decides only how long to
wait before the next attempt (start jitter, 409 spread, backoff while the API fails) and
when the API has failed for too long.
"""

import logging
import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from node_agent.backoff import Backoff
from node_agent.kube.errors import ApiConflict, ApiError, ObjectMissing, WatchExpired
from node_agent.kube.model import EventStream, LeaseApi, ObjectRef
from node_agent.restart_slots.config import SlotConfig, SlotTiming
from node_agent.restart_slots.leases import (
    Claim,
    NoSlot,
    QuietTimer,
    SlotLease,
    choose_slot,
    claimed,
    new_lease,
    node_fraction,
    slot_leases,
    slot_order,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """This node now holds `lease`."""

    lease: SlotLease


@dataclass(frozen=True)
class Retry:
    """No slot yet: attempt again in `after` seconds (0: at once)."""

    after: float


@dataclass(frozen=True)
class GaveUp:
    """The API has failed for longer than max-wait (plus this node's spread)."""

    unreachable_for: float
    problem: str


Attempted = Claimed | Retry | GaveUp

_LIST_AGAIN = Retry(0.0)
"""The watch ended without a freed slot (or was cancelled): list again at once."""


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


class SlotAcquirer:
    """Claims a slot for this node. `attempt` runs on the slot thread; `begin` and `cancel`
    are quick and may be called from any thread."""

    def __init__(
        self,
        *,
        api: LeaseApi,
        config: SlotConfig,
        timing: SlotTiming,
        clock: Callable[[], float],
        wall_clock: Callable[[], datetime],
        rng: random.Random,
    ) -> None:
        self._api = api
        self._config = config
        self._timing = timing
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng
        self._order = slot_order(config.node, config.concurrency)
        self._quiet = QuietTimer()
        self._backoff = Backoff(initial=timing.retry_initial, maximum=timing.retry_max, rng=rng)
        # Kept across waits until the API answers again: what the last failures taught.
        self._failed_slots: set[str] = set()
        self._lock = threading.Lock()
        self._open = False
        self._stream: EventStream | None = None
        self._not_before = 0.0
        self._unreachable_since: float | None = None

    def begin(self) -> None:
        """A wait starts: its first attempt comes after a random start jitter, and attempts
        may watch the slots until `cancel`."""
        with self._lock:
            self._open = True
            self._not_before = self._clock() + self._rng.uniform(0, self._timing.start_jitter)
            self._unreachable_since = None

    def cancel(self) -> None:
        """The wait is over: end the watch under way at once, and open no other."""
        with self._lock:
            self._open = False
            if self._stream is not None:
                self._stream.interrupt()

    def attempt(self) -> Attempted:
        """One attempt: list the slots, then claim one, or watch until one is freed."""
        with self._lock:
            delay = self._not_before - self._clock()
        if delay > 0:
            return Retry(delay)
        try:
            listing = self._api.list_leases(
                self._config.namespace, request_timeout=self._timing.request_timeout
            )
        except ApiError as error:
            return self._failed(error)
        leases = slot_leases(listing.items, self._order)
        choice = self._choose(leases)
        if isinstance(choice, NoSlot):
            self._answered()  # every slot is held: a normal wait
            watched = self._watch_slots(listing.resource_version, choice.retry_in, leases)
            if not isinstance(watched, Claim):
                return watched
            choice = watched
        return self._claim(choice)

    # choosing and claiming

    def _choose(self, leases: Mapping[str, SlotLease]) -> Claim | NoSlot:
        now = self._clock()
        self._quiet.observe(leases, now)
        # A slot whose claim failed (403 on one name, say) is tried last, so the others
        # still serve; the API counts as answering only once a claim or a wait works.
        order = sorted(self._order, key=lambda slot: slot in self._failed_slots)
        return choose_slot(
            node=self._config.node,
            order=order,
            leases=leases,
            quiet=self._quiet,
            now=now,
            default_ttl=self._config.lease_seconds,
        )

    def _claim(self, claim: Claim) -> Attempted:
        try:
            answer = self._send_claim(claim)
        except (ApiConflict, ObjectMissing) as error:
            log.debug("restart slot %s: someone was faster (%s)", claim.slot, error)
            return Retry(self._rng.uniform(0, self._timing.conflict_backoff))
        except ApiError as error:
            self._failed_slots.add(claim.slot)
            return self._failed(error)
        self._answered()
        lease = SlotLease.parse(answer)
        if lease is None:
            log.warning("restart slot %s: the API answered an unusable Lease", claim.slot)
            return Retry(self._timing.renew_retry)
        return Claimed(lease)

    def _send_claim(self, claim: Claim) -> Mapping[str, Any]:
        at, config, timeout = self._wall_clock(), self._config, self._timing.request_timeout
        if claim.kind == "create":
            body = new_lease(claim.slot, node=config.node, ttl=config.lease_seconds, at=at)
            return self._api.create_lease(config.namespace, body, request_timeout=timeout)
        assert claim.lease is not None, "take and reclaim carry the Lease read"
        body = claimed(claim.lease, node=config.node, ttl=config.lease_seconds, at=at)
        ref = ObjectRef(config.namespace, claim.slot)
        return self._api.replace_lease(ref, body, request_timeout=timeout)

    # watching held slots

    def _watch_slots(
        self, resource_version: str, retry_in: float, leases: dict[str, SlotLease]
    ) -> Claim | Retry | GaveUp:
        """The claim to make at once for a slot freed on the watch; or, when a slot may have
        been abandoned, its holder changed, the watch failed or `longest_watch` passed, what
        to do before listing again."""
        seconds = max(1, math.ceil(min(retry_in, self._timing.longest_watch)))
        try:
            stream = self._api.watch_leases(
                self._config.namespace,
                resource_version=resource_version,
                timeout_seconds=seconds,
                request_timeout=(self._timing.connect_timeout, seconds + self._timing.read_timeout),
            )
        except WatchExpired:
            return _LIST_AGAIN
        except ApiError as error:
            return self._failed(error)
        if not self._register(stream):
            stream.close()
            return _LIST_AGAIN
        return self._follow_until_freed(stream, leases) or _LIST_AGAIN

    def _register(self, stream: EventStream) -> bool:
        """Make `stream` the one `cancel` ends; False if the wait is already over."""
        with self._lock:
            if self._open:
                self._stream = stream
            return self._open

    def _follow_until_freed(
        self, stream: EventStream, leases: dict[str, SlotLease]
    ) -> Claim | None:
        race = _FreedSlotRace(stream, head_start=self._rng.uniform(0, self._timing.claim_spread))
        try:
            self._follow(stream, leases, race)
        except (ApiError, WatchExpired) as error:
            if race.claim is None:
                log.debug("restart slots: watch ended (%s); listing again", error)
        finally:
            race.cancel()
            with self._lock:
                self._stream = None
            stream.close()
        return race.claim

    def _follow(
        self, stream: EventStream, leases: dict[str, SlotLease], race: _FreedSlotRace
    ) -> None:
        """Read slot changes until the stream ends (by the server, by `race` or by
        `cancel`). Renewals only restart their slot's quiet time: waiting nodes stay asleep."""
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

    # the API's health

    def _failed(self, error: ApiError) -> Retry | GaveUp:
        """Back off, but not past the moment to give up: max-wait after the first failure of
        this wait, plus this node's place in a spread of one TTL (nodes do not all fail open
        at once)."""
        now = self._clock()
        with self._lock:
            first = self._unreachable_since is None
            if self._unreachable_since is None:
                self._unreachable_since = now
            since = self._unreachable_since
        if first:
            log.warning("restart slots: %s; retrying, containerd restart waits", error)
        else:
            log.debug("restart slots: %s", error)
        spread = node_fraction(self._config.node) * self._config.lease_ttl
        give_up_at = since + self._config.max_wait + spread
        if now >= give_up_at:
            return GaveUp(unreachable_for=now - since, problem=str(error))
        return Retry(min(self._backoff.next_delay(), give_up_at - now))

    def _answered(self) -> None:
        with self._lock:
            self._unreachable_since = None
        self._backoff.reset()
        self._failed_slots.clear()
