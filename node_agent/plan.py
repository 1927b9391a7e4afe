"""What to change in one node file: pure comparison of (current entries, desired entries,
what the agent owns). No I/O.

Ownership rules (docs/reliability.md "Ownership"):
- a desired key the agent does not own yet is taken over; whatever the file held there is
  remembered as `previous` (None when the key was absent);
- an owned key that is no longer desired gets its `previous` value back (or is removed);
- keys the agent never owned are never in `updates`.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from node_agent.targets import Entry

#: What a file held under a key before the agent took it over (None: the key was absent).
Previous = dict[str, Any] | None
#: File key → its previous value, for every key the agent owns in one file.
Owned = dict[str, Previous]

Action = Literal["add", "update", "take over", "remove", "restore"]


@dataclass(frozen=True)
class Change:
    """One key that differs; `action` says what the write does to it."""

    key: str
    action: Action


@dataclass(frozen=True)
class TargetPlan:
    """The edit that brings one file to the desired state, and ownership after it."""

    updates: dict[str, Entry | None] = field(default_factory=dict)
    owned_after: Owned = field(default_factory=dict)
    changes: tuple[Change, ...] = ()

    @property
    def in_sync(self) -> bool:
        return not self.updates


def plan_target(
    *, current: Mapping[str, Mapping[str, Any]], desired: Mapping[str, Entry], owned: Owned
) -> TargetPlan:
    """The updates that make `current` carry exactly `desired` for the keys the agent owns."""
    updates: dict[str, Entry | None] = {}
    changes: list[Change] = []
    owned_after: Owned = {}
    for key, entry in desired.items():
        owned_after[key] = owned[key] if key in owned else _copy(current.get(key))
        if not _same(current.get(key), entry):
            updates[key] = entry
            changes.append(Change(key, _action_for_desired(key, current, owned)))
    for key, previous in owned.items():
        if key in desired or _same(current.get(key), previous):
            continue
        updates[key] = previous
        changes.append(Change(key, "remove" if previous is None else "restore"))
    return TargetPlan(updates=updates, owned_after=owned_after, changes=tuple(changes))


def owned_while_writing(before: Owned, after: Owned) -> Owned:
    """Ownership to persist *before* a write: every key owned before or after it.

    If the process dies between the state write and the file write, the next run still knows
    every key it may have touched and the value to restore for it.
    """
    return {**after, **before}


def _action_for_desired(key: str, current: Mapping[str, object], owned: Owned) -> Action:
    if key not in current:
        return "add"
    return "update" if key in owned else "take over"


def _same(current: Mapping[str, Any] | None, wanted: Mapping[str, Any] | None) -> bool:
    if current is None or wanted is None:
        return current is None and wanted is None
    return dict(current) == dict(wanted)


def _copy(entry: Mapping[str, Any] | None) -> Previous:
    return None if entry is None else dict(entry)
