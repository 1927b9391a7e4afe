"""The lifecycle of this node's restart slot, as a pure state machine. No I/O, no clock, no
threads: `transition(slot, event)` says what the slot becomes and what must be done about
it; `RestartSlots` (coordinator.py) feeds it the worker's calls and the API's answers and
carries out the actions. docs/restart-slots.md draws the same machine;
tests/test_restart_slot_machine.py checks that the drawing and this code agree.
"""

import enum
from dataclasses import dataclass, replace


class SlotState(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting"
    """A restart is needed: a slot is being sought."""
    HOLDING = "holding"
    """A slot is held for the restart the worker is about to make."""
    KEPT = "kept"
    """The restart under this slot failed: the slot stays held, so the rollout stops here."""
    SETTLING = "settling"
    """The restart went well (or was not needed): the slot is given back at `release_at`."""
    UNCOORDINATED = "uncoordinated"
    """The API was unreachable for longer than max-wait: restart without a slot."""


#: States in which the worker may restart containerd.
MAY_RESTART = frozenset({SlotState.HOLDING, SlotState.KEPT, SlotState.UNCOORDINATED})
#: States in which a Lease is held (renewed, and given back or kept).
HOLDS_LEASE = frozenset({SlotState.HOLDING, SlotState.KEPT, SlotState.SETTLING})


@dataclass(frozen=True)
class Slot:
    state: SlotState = SlotState.IDLE
    release_at: float = 0.0
    """SETTLING: when to give the slot back (monotonic seconds)."""
    again: bool = False
    """A restart was requested while SETTLING: wait for a slot again once it is given back."""


# Events


@dataclass(frozen=True)
class Requested:
    """The worker: containerd's config needs a restart."""


@dataclass(frozen=True)
class PassDone:
    """The worker's pass ended: its restart result (`success`, `rolled_back`, `failed`, or
    None: no restart), whether containerd runs the desired config, whether the pass failed."""

    restart: str | None
    in_sync: bool
    failed: bool
    now: float
    settle: float


@dataclass(frozen=True)
class Granted:
    """A claim succeeded: this node holds a slot's Lease."""

    now: float
    stopping: bool = False


@dataclass(frozen=True)
class ApiGaveUp:
    """The API has been unreachable for longer than max-wait while waiting."""


@dataclass(frozen=True)
class GivenBack:
    """The Lease was released, lost to someone else, or left to expire."""

    stopping: bool = False


Event = Requested | PassDone | Granted | ApiGaveUp | GivenBack


class Action(enum.Enum):
    BEGIN_WAIT = "begin wait"
    """Start seeking a slot (after a random start delay) and report the wait."""
    END_WAIT = "end wait"
    """Stop seeking: interrupt the watch, report that no slot is needed any more."""
    REPORT_ACQUIRED = "report acquired"
    REPORT_KEPT = "report kept"
    REPORT_FAILED_OPEN = "report failed open"
    GRANT = "grant"
    """Tell the worker it may restart now (it asks for one more pass)."""


def transition(slot: Slot, event: Event) -> tuple[Slot, tuple[Action, ...]]:
    """What `slot` becomes on `event`, and what to do about it."""
    if isinstance(event, Requested):
        return _on_request(slot)
    if isinstance(event, PassDone):
        return _after_pass(slot, event)
    if isinstance(event, Granted):
        return _on_granted(slot, event)
    if isinstance(event, ApiGaveUp):
        return _on_api_gave_up(slot)
    return _on_given_back(slot, event)


def _on_request(slot: Slot) -> tuple[Slot, tuple[Action, ...]]:
    if slot.state is SlotState.IDLE:
        return Slot(SlotState.WAITING), (Action.BEGIN_WAIT,)
    if slot.state is SlotState.SETTLING:
        return replace(slot, again=True), ()
    return slot, ()


def _after_pass(slot: Slot, done: PassDone) -> tuple[Slot, tuple[Action, ...]]:
    state = slot.state
    if state in (SlotState.HOLDING, SlotState.KEPT):
        return _after_holding_pass(slot, done)
    if state is SlotState.UNCOORDINATED and (done.restart is not None or done.in_sync):
        return Slot(SlotState.IDLE), ()
    if state is SlotState.WAITING and done.in_sync:
        return Slot(SlotState.IDLE), (Action.END_WAIT,)
    return slot, ()


def _after_holding_pass(slot: Slot, done: PassDone) -> tuple[Slot, tuple[Action, ...]]:
    if done.restart == "success":
        return _settling(slot, at=done.now + done.settle), ()
    if done.restart is not None:
        return replace(slot, state=SlotState.KEPT), (Action.REPORT_KEPT,)
    if done.in_sync or (done.failed and slot.state is SlotState.HOLDING):
        # Nothing restarted: the change needs no restart any more, or the pass failed
        # before restarting (a node-file problem of this node, not a bad change).
        return _settling(slot, at=done.now), ()
    return slot, ()


def _on_granted(slot: Slot, granted: Granted) -> tuple[Slot, tuple[Action, ...]]:
    if slot.state is not SlotState.WAITING or granted.stopping:
        return _settling(slot, at=granted.now), ()  # no longer wanted: give it back
    return Slot(SlotState.HOLDING), (Action.REPORT_ACQUIRED, Action.GRANT)


def _on_api_gave_up(slot: Slot) -> tuple[Slot, tuple[Action, ...]]:
    if slot.state is not SlotState.WAITING:
        return slot, ()
    return Slot(SlotState.UNCOORDINATED), (Action.REPORT_FAILED_OPEN, Action.GRANT)


def _on_given_back(slot: Slot, given_back: GivenBack) -> tuple[Slot, tuple[Action, ...]]:
    if slot.again and not given_back.stopping:
        return Slot(SlotState.WAITING), (Action.BEGIN_WAIT,)
    return Slot(SlotState.IDLE), ()


def _settling(slot: Slot, *, at: float) -> Slot:
    return replace(slot, state=SlotState.SETTLING, release_at=at)
