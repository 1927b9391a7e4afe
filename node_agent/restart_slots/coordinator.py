"""`RestartSlots`: one thread that gets, keeps and gives back this node's restart slot.

The worker asks (`request`) when containerd's config needs a restart, learns from
`may_restart` whether it may go ahead, and says what its pass did (`pass_done`). Everything
that talks to the API happens on this module's own thread, so a slow or absent API never
blocks a reconcile, and the slot's Lease is renewed every TTL/3 while the worker restarts
containerd.

The slot's states and what moves it between them are `machine.transition` (pure, and drawn
in docs/restart-slots.md). This module feeds it events (the worker's calls, what the API
calls came to) and carries out its actions; the API calls themselves are the
`SlotAcquirer`'s (seeking a slot: list, claim, watch) and the `SlotHolder`'s (holding one:
renew, release, read back).
"""

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from node_agent.kube.model import LeaseApi
from node_agent.restart_slots.acquirer import Claimed, GaveUp, Retry, SlotAcquirer
from node_agent.restart_slots.config import SlotConfig, SlotTiming
from node_agent.restart_slots.holder import (
    Lost,
    Released,
    ReleaseFailed,
    ReleaseOutcome,
    RenewOutcome,
    SlotHolder,
    StillHeld,
)
from node_agent.restart_slots.leases import SlotLease
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

# The daemon builds a `RestartSlots` from a `SlotConfig` and a `SlotTiming`: all three from here.
__all__ = ["RestartSlots", "SlotConfig", "SlotReporter", "SlotTiming"]

log = logging.getLogger(__name__)


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
        timing = timing or SlotTiming()
        self._reporter = reporter
        self._on_granted = on_granted
        self._clock = clock
        self._acquirer = SlotAcquirer(
            api=api,
            config=config,
            timing=timing,
            clock=clock,
            wall_clock=wall_clock,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not cryptography
        )
        self._holder = SlotHolder(
            api=api, config=config, timing=timing, clock=clock, wall_clock=wall_clock
        )
        self._changed = threading.Condition()
        self._slot = Slot()
        self._stopped = False
        self._wait_started = 0.0
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
            self._acquirer.cancel()
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
            return self._holder.slot

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
            slot = self._holder.slot
        self._carry_out(actions, slot=slot)

    def _transition(self, event: Event) -> tuple[Action, ...]:
        """The state change itself, and what must happen under the lock: the acquirer's
        wait begins or ends with the machine's. Call with the lock held."""
        self._slot, actions = transition(self._slot, event)
        if Action.BEGIN_WAIT in actions:
            self._wait_started = self._clock()
            if not self._stopped:
                self._acquirer.begin()
        if Action.END_WAIT in actions:
            self._acquirer.cancel()
        self._changed.notify_all()
        return actions

    def _carry_out(self, actions: tuple[Action, ...], *, slot: str | None) -> None:
        """The actions that call out of this module; `slot` is the slot held when they were
        decided. The acquired and failed-open reports are their events' own (below)."""
        config = self.config
        for action in actions:
            if action is Action.BEGIN_WAIT:
                self._reporter.restart_queued(slots=config.concurrency, namespace=config.namespace)
            elif action is Action.END_WAIT:
                self._reporter.restart_wait_over()
            elif action is Action.REPORT_KEPT:
                assert slot is not None, "a kept slot has a Lease"
                self._reporter.restart_slot_kept(slot, namespace=config.namespace)
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
                self._seek()
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

    def _seek(self) -> None:
        attempted = self._acquirer.attempt()
        if isinstance(attempted, Claimed):
            self._granted(attempted.lease)
        elif isinstance(attempted, Retry):
            self._pause(attempted.after)
        else:
            self._fail_open(attempted)

    def _granted(self, lease: SlotLease) -> None:
        with self._changed:
            self._holder.hold(lease)
            now = self._clock()
            actions = self._transition(Granted(now, stopping=self._stopped))
            waited = now - self._wait_started
        if Action.REPORT_ACQUIRED in actions:
            log.info("restart slot %s acquired after %.1fs", lease.name, waited)
            self._reporter.restart_slot_acquired(lease.name, waited=waited)
        self._carry_out(actions, slot=lease.name)

    def _fail_open(self, gave_up: GaveUp) -> None:
        with self._changed:
            actions = self._transition(ApiGaveUp())
        if Action.REPORT_FAILED_OPEN not in actions:
            return
        log.warning(
            "restart slots: the API has been unreachable for %.0fs (over --restart-max-wait): "
            "restarting containerd without a slot (%s)",
            gave_up.unreachable_for,
            gave_up.problem,
        )
        self._reporter.restart_failed_open(
            unreachable_for=gave_up.unreachable_for, problem=gave_up.problem
        )
        self._carry_out(actions, slot=None)

    # holding a slot

    def _keep_or_release(self) -> None:
        with self._changed:
            now = self._clock()
            releasing = self._slot.state is SlotState.SETTLING
            release_at = self._slot.release_at
            renew_at = self._holder.renew_at
            if releasing and now >= release_at:
                due = "release"
            elif now >= renew_at:
                due = "renew"
            else:
                self._changed.wait(min(renew_at, release_at if releasing else math.inf) - now)
                return
        if due == "release":
            self._release(final=False)
        else:
            self._after(self._holder.renew())

    def _release(self, *, final: bool) -> None:
        self._after(self._holder.release(final=final))

    def _after(self, outcome: RenewOutcome | ReleaseOutcome) -> None:
        """What a renewal or release came to."""
        if isinstance(outcome, StillHeld):
            return  # the holder knows when to write again
        if isinstance(outcome, ReleaseFailed):
            with self._changed:
                self._slot = replace(self._slot, release_at=outcome.retry_at)
            return
        self._given_back()
        if isinstance(outcome, Released):
            self._reporter.restart_slot_released(outcome.slot)
        elif isinstance(outcome, Lost):
            self._reporter.restart_slot_lost(outcome.slot, holder=outcome.holder)

    def _given_back(self) -> None:
        """The Lease is no longer held (released, lost or left to expire)."""
        with self._changed:
            self._holder.drop()
            actions = self._transition(GivenBack(stopping=self._stopped))
        self._carry_out(actions, slot=None)

    # helpers

    def _pause(self, seconds: float) -> None:
        """Wait up to `seconds` before the next attempt, less if the wait ends (the state
        changes) or the slots are stopped."""
        with self._changed:
            if self._slot.state is SlotState.WAITING and not self._stopped and seconds > 0:
                self._changed.wait(seconds)
