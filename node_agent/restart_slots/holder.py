"""`SlotHolder`: the API side of the slot this node holds. It keeps the Lease as last stored
and when to renew it (every TTL/3, sooner after a failure), renews and releases it, and reads
it back when the API refuses a write, to tell an edit by someone else (still ours) from a
lost slot. What a renewal or release came to (`StillHeld`, `Lost`, `Released`, ...) is for
`RestartSlots` to feed to the state machine, which decides when to give the slot back.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from node_agent.kube.errors import ApiConflict, ApiError, ObjectMissing
from node_agent.kube.model import LeaseApi, ObjectRef, RequestTimeout
from node_agent.restart_slots.config import SlotConfig, SlotTiming
from node_agent.restart_slots.leases import SlotLease, released, renewed, slot_leases

log = logging.getLogger(__name__)

# Stopping: the release must fit in the daemon's stop budget.
_FINAL_TIMEOUT: RequestTimeout = (1.0, 2.0)


@dataclass(frozen=True)
class StillHeld:
    """The slot is still this node's: renewed, or a write to try again (a renewal at
    `renew_at`, a release on the next turn)."""


@dataclass(frozen=True)
class Lost:
    """Someone else released or took the slot (`holder`: who holds it now, if anyone)."""

    slot: str
    holder: str | None


@dataclass(frozen=True)
class Released:
    """The slot is free again (or its Lease was deleted)."""

    slot: str


@dataclass(frozen=True)
class LeftToExpire:
    """The release failed on the last try, or after the Lease had expired anyway: others
    may take the slot once its TTL has passed."""


@dataclass(frozen=True)
class ReleaseFailed:
    """The release got no answer: try again at `retry_at`."""

    retry_at: float


RenewOutcome = StillHeld | Lost
ReleaseOutcome = Released | LeftToExpire | ReleaseFailed | StillHeld | Lost


class SlotHolder:
    """Keeps this node's slot Lease. `hold`, `renew`, `release` and `drop` run on the slot
    thread; `slot` may be read from any thread."""

    def __init__(
        self,
        *,
        api: LeaseApi,
        config: SlotConfig,
        timing: SlotTiming,
        clock: Callable[[], float],
        wall_clock: Callable[[], datetime],
    ) -> None:
        self._api = api
        self._config = config
        self._timing = timing
        self._clock = clock
        self._wall_clock = wall_clock
        self._lease: SlotLease | None = None
        self._renewed_at = 0.0
        self.renew_at = 0.0
        """When the next renewal is due (monotonic seconds)."""

    @property
    def slot(self) -> str | None:
        """The name of the slot held, if any."""
        lease = self._lease
        return lease.name if lease is not None else None

    def hold(self, lease: SlotLease) -> None:
        """`lease` was just claimed: renew it every TTL/3 from now."""
        now = self._clock()
        self._lease = lease
        self._renewed_at = now
        self.renew_at = now + self._config.renew_every

    def drop(self) -> None:
        """The slot was given back, lost or left to expire: nothing is held any more."""
        self._lease = None

    def renew(self) -> RenewOutcome:
        lease = self._held()
        body = renewed(lease, at=self._wall_clock())
        try:
            answer = self._api.replace_lease(
                self._ref(lease.name), body, request_timeout=self._timing.request_timeout
            )
        except (ApiConflict, ObjectMissing):
            return self._read_back(lease.name)
        except ApiError as error:
            log.warning("restart slot %s: renewal failed (%s); retrying", lease.name, error)
            self._retry_soon()
            return StillHeld()
        now = self._clock()
        stored = SlotLease.parse(answer)
        if stored is not None:
            self._lease = stored
            self._renewed_at = now
        self.renew_at = now + self._config.renew_every
        return StillHeld()

    def release(self, *, final: bool) -> ReleaseOutcome:
        """Clear the holder. When that fails on the last try (`final`, when stopping) or
        after the Lease has expired anyway, leave it to expire."""
        lease = self._held()
        timeout = _FINAL_TIMEOUT if final else self._timing.request_timeout
        try:
            self._api.replace_lease(self._ref(lease.name), released(lease), request_timeout=timeout)
        except ObjectMissing:
            pass  # deleted: free
        except (ApiConflict, ApiError) as error:
            now = self._clock()
            if final or now >= self._renewed_at + self._config.lease_ttl:
                log.warning("restart slot %s: not released (%s); it expires", lease.name, error)
                return LeftToExpire()
            if isinstance(error, ApiConflict):
                return self._read_back(lease.name)  # still ours: released on the next turn
            log.warning("restart slot %s: release failed (%s); retrying", lease.name, error)
            return ReleaseFailed(retry_at=now + self._timing.renew_retry)
        log.info("restart slot %s released", lease.name)
        return Released(lease.name)

    def _read_back(self, name: str) -> StillHeld | Lost:
        """A write met a 409 or 404: still ours (someone edited the Lease), or lost?"""
        try:
            listing = self._api.list_leases(
                self._config.namespace, request_timeout=self._timing.request_timeout
            )
        except ApiError as error:
            log.warning("restart slot %s: cannot read it back (%s); retrying", name, error)
            self._retry_soon()
            return StillHeld()
        lease = slot_leases(listing.items, [name]).get(name)
        if lease is not None and lease.holder == self._config.node:
            self._lease = lease
            self.renew_at = self._clock()  # renew at once, from the version read
            return StillHeld()
        holder = lease.holder if lease is not None else None
        log.warning(
            "restart slot %s was released or taken by someone else (holder now: %s)",
            name,
            holder or "none",
        )
        return Lost(name, holder)

    def _retry_soon(self) -> None:
        self.renew_at = self._clock() + self._timing.renew_retry

    def _held(self) -> SlotLease:
        lease = self._lease
        assert lease is not None, "a holding state has a Lease"
        return lease

    def _ref(self, slot: str) -> ObjectRef:
        return ObjectRef(self._config.namespace, slot)
