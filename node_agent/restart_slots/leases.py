"""Pure slot logic: which Lease a node tries, when a held Lease counts as abandoned, and the
Lease bodies it sends. No I/O, no clock of its own: time comes in as arguments.

Expiry is judged only by what this node saw on its own monotonic clock: a Lease held by
another node is free once its resourceVersion has stayed the same for `leaseDurationSeconds`
since this node first saw that resourceVersion. `renewTime` is written (for people reading
the Lease) but never compared with the local wall clock: node clocks differ.
"""

import copy
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

SLOT_PREFIX = "node-agent-restart-"


def slot_name(index: int) -> str:
    return f"{SLOT_PREFIX}{index}"


def _node_hash(node: str) -> int:
    # Not hash(): Python randomises it per process; every pod must agree on a node's slot.
    return int.from_bytes(hashlib.sha256(node.encode("utf-8")).digest()[:8], "big")


def slot_order(node: str, count: int) -> list[str]:
    """The slots in the order `node` tries them: from hash(node) mod count, wrapping, so
    nodes spread over the slots instead of all racing for slot 0."""
    start = _node_hash(node) % count
    return [slot_name((start + offset) % count) for offset in range(count)]


def node_fraction(node: str) -> float:
    """A stable number in [0, 1) for `node`: its place in a spread-out schedule."""
    return _node_hash(node) / 2**64


@dataclass(frozen=True)
class SlotLease:
    """One slot Lease as read from the API."""

    name: str
    resource_version: str
    holder: str | None
    """`spec.holderIdentity`; None when empty (the slot is free)."""
    duration: int | None
    """`spec.leaseDurationSeconds`, if a positive whole number."""
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "SlotLease | None":
        """The slot in `raw`, or None if `raw` is not a usable Lease."""
        metadata = raw.get("metadata")
        spec = raw.get("spec") or {}
        if not isinstance(metadata, Mapping) or not isinstance(spec, Mapping):
            return None
        name, version = metadata.get("name"), metadata.get("resourceVersion")
        if not isinstance(name, str) or not isinstance(version, str) or not version:
            return None
        holder = spec.get("holderIdentity")
        duration = spec.get("leaseDurationSeconds")
        return cls(
            name=name,
            resource_version=version,
            holder=holder if isinstance(holder, str) and holder else None,
            duration=duration if isinstance(duration, int) and duration > 0 else None,
            raw=raw,
        )


def slot_leases(items: Iterable[Mapping[str, Any]], names: Iterable[str]) -> dict[str, SlotLease]:
    """The slot Leases among `items` (a Lease list), by name."""
    wanted = set(names)
    leases = (SlotLease.parse(item) for item in items)
    return {lease.name: lease for lease in leases if lease is not None and lease.name in wanted}


class QuietTimer:
    """Since when (local monotonic seconds) each slot has shown its current resourceVersion."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}

    def observe(self, leases: Mapping[str, SlotLease], now: float) -> None:
        """Every slot as just listed (a slot not in `leases` is gone)."""
        for lease in leases.values():
            self.observe_one(lease, now)
        for gone in set(self._seen) - set(leases):
            del self._seen[gone]

    def observe_one(self, lease: SlotLease, now: float) -> None:
        """A change of one slot seen on a watch (the others are unchanged)."""
        seen = self._seen.get(lease.name)
        if seen is None or seen[0] != lease.resource_version:
            self._seen[lease.name] = (lease.resource_version, now)

    def quiet_for(self, lease: SlotLease, now: float) -> float:
        """Seconds `lease` has shown this resourceVersion (0 if it was never observed)."""
        seen = self._seen.get(lease.name)
        if seen is None or seen[0] != lease.resource_version:
            return 0.0
        return now - seen[1]


ClaimKind = Literal["create", "take", "reclaim"]


@dataclass(frozen=True)
class Claim:
    """What to do for a slot: `create` a missing Lease, `take` a free or abandoned one, or
    `reclaim` one this node already holds (a replacement pod on the same node)."""

    kind: ClaimKind
    slot: str
    lease: SlotLease | None = None


@dataclass(frozen=True)
class NoSlot:
    """Every slot is held and renewed; the earliest could be free in `retry_in` seconds."""

    retry_in: float


def choose_slot(
    *,
    node: str,
    order: list[str],
    leases: Mapping[str, SlotLease],
    quiet: QuietTimer,
    now: float,
    default_ttl: int,
) -> Claim | NoSlot:
    """The slot to claim now, in preference: one this node holds, then in `order` a missing,
    free or abandoned one."""
    for name in order:
        lease = leases.get(name)
        if lease is not None and lease.holder == node:
            return Claim("reclaim", name, lease)
    earliest = float("inf")
    for name in order:
        lease = leases.get(name)
        if lease is None:
            return Claim("create", name)
        if lease.holder is None:
            return Claim("take", name, lease)
        remaining = (lease.duration or default_ttl) - quiet.quiet_for(lease, now)
        if remaining <= 0:
            return Claim("take", name, lease)
        earliest = min(earliest, remaining)
    return NoSlot(retry_in=earliest)


# --- Lease bodies ---------------------------------------------------------------------------


def micro_time(at: datetime) -> str:
    """A `MicroTime` (RFC 3339, microseconds, UTC)."""
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_lease(name: str, *, node: str, ttl: int, at: datetime) -> dict[str, Any]:
    """A slot Lease created already held by `node`."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "node-agent"},
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": ttl,
            "acquireTime": micro_time(at),
            "renewTime": micro_time(at),
            "leaseTransitions": 0,
        },
    }


def claimed(lease: SlotLease, *, node: str, ttl: int, at: datetime) -> dict[str, Any]:
    """`lease` held by `node` from `at`; carries the resourceVersion it was read at."""
    body, spec = _editable(lease)
    if lease.holder != node:
        spec["leaseTransitions"] = _count(spec.get("leaseTransitions")) + 1
        spec["acquireTime"] = micro_time(at)
    spec.update(holderIdentity=node, leaseDurationSeconds=ttl, renewTime=micro_time(at))
    return body


def renewed(lease: SlotLease, *, at: datetime) -> dict[str, Any]:
    body, spec = _editable(lease)
    spec["renewTime"] = micro_time(at)
    return body


def released(lease: SlotLease) -> dict[str, Any]:
    """`lease` free again: no holder (what the next node looks for)."""
    body, spec = _editable(lease)
    for key in ("holderIdentity", "acquireTime", "renewTime"):
        spec.pop(key, None)
    return body


def _editable(lease: SlotLease) -> tuple[dict[str, Any], dict[str, Any]]:
    body = copy.deepcopy(dict(lease.raw))
    body.setdefault("metadata", {})["resourceVersion"] = lease.resource_version
    spec = body.get("spec")
    if not isinstance(spec, dict):
        spec = body["spec"] = {}
    return body, spec


def _count(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
