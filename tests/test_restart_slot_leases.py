"""The pure part of restart slots: which slot a node tries, when a held slot is abandoned
(judged on the local monotonic clock only), and the Lease bodies sent."""

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

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

AT = datetime(2026, 11, 25, 15, 0, 0, 123456, tzinfo=UTC)


def lease(name: str, *, holder: str | None, rv: str = "7", duration: int | None = 60) -> SlotLease:
    spec: dict[str, Any] = {"leaseDurationSeconds": duration}
    if holder is not None:
        spec["holderIdentity"] = holder
    raw = {"metadata": {"name": name, "resourceVersion": rv, "uid": "u1"}, "spec": spec}
    parsed = SlotLease.parse(raw)
    assert parsed is not None
    return parsed


def choose(
    leases: dict[str, SlotLease],
    *,
    node: str = "node-a",
    quiet: QuietTimer | None = None,
    now: float = 0.0,
) -> Claim | NoSlot:
    return choose_slot(
        node=node,
        order=["node-agent-restart-0", "node-agent-restart-1"],
        leases=leases,
        quiet=quiet or QuietTimer(),
        now=now,
        default_ttl=60,
    )


class TestSlotOrder:
    def test_every_slot_once_starting_from_the_node_hash(self) -> None:
        order = slot_order("node-a", 5)
        assert sorted(order) == [f"node-agent-restart-{i}" for i in range(5)]
        start = int(order[0].rsplit("-", 1)[1])
        assert order == [f"node-agent-restart-{(start + i) % 5}" for i in range(5)]

    def test_the_same_node_always_gets_the_same_order(self) -> None:
        # Not Python's hash(): that differs between processes (a replacement pod).
        assert slot_order("ip-10-0-0-1", 7) == slot_order("ip-10-0-0-1", 7)

    def test_nodes_spread_over_the_slots(self) -> None:
        first = Counter(slot_order(f"node-{i}", 5)[0] for i in range(500))
        assert len(first) == 5
        assert min(first.values()) > 60  # 100 each if perfectly even

    def test_node_fraction_is_stable_and_in_range(self) -> None:
        fractions = [node_fraction(f"node-{i}") for i in range(200)]
        assert all(0 <= f < 1 for f in fractions)
        assert node_fraction("node-3") == fractions[3]
        assert len(set(fractions)) == 200


class TestChooseSlot:
    def test_a_missing_lease_is_created(self) -> None:
        assert choose({}) == Claim("create", "node-agent-restart-0")

    def test_a_free_lease_is_taken_with_the_version_read(self) -> None:
        free = lease("node-agent-restart-0", holder=None)
        assert choose({free.name: free}) == Claim("take", free.name, free)

    def test_a_lease_this_node_holds_is_reclaimed_first(self) -> None:
        free = lease("node-agent-restart-0", holder=None)
        mine = lease("node-agent-restart-1", holder="node-a")
        assert choose({free.name: free, mine.name: mine}) == Claim("reclaim", mine.name, mine)

    def test_slots_are_tried_in_order(self) -> None:
        held = lease("node-agent-restart-0", holder="node-b")
        assert choose({held.name: held}) == Claim("create", "node-agent-restart-1")

    def test_a_held_lease_first_seen_now_is_not_free(self) -> None:
        leases = {
            n: lease(n, holder="node-b", duration=60)
            for n in ("node-agent-restart-0", "node-agent-restart-1")
        }
        quiet = QuietTimer()
        quiet.observe(leases, now=100.0)
        assert choose(leases, quiet=quiet, now=100.0) == NoSlot(retry_in=60.0)

    def test_a_held_lease_unchanged_for_its_duration_is_taken(self) -> None:
        held = lease("node-agent-restart-0", holder="node-b", duration=30)
        other = lease("node-agent-restart-1", holder="node-c", duration=60)
        leases = {held.name: held, other.name: other}
        quiet = QuietTimer()
        quiet.observe(leases, now=100.0)
        waiting = choose(leases, quiet=quiet, now=129.9)
        assert isinstance(waiting, NoSlot) and waiting.retry_in == pytest.approx(0.1)
        quiet.observe(leases, now=130.0)
        assert choose(leases, quiet=quiet, now=130.0) == Claim("take", held.name, held)

    def test_a_renewal_restarts_the_quiet_time(self) -> None:
        quiet = QuietTimer()
        before = lease("node-agent-restart-0", holder="node-b", rv="7", duration=30)
        quiet.observe({before.name: before}, now=100.0)
        after = lease("node-agent-restart-0", holder="node-b", rv="8", duration=30)
        quiet.observe({after.name: after}, now=125.0)
        assert quiet.quiet_for(after, now=150.0) == 25.0
        assert quiet.quiet_for(before, now=150.0) == 0.0

    def test_renew_time_is_never_read(self) -> None:
        # A holder whose wall clock runs 10 minutes behind writes old renewTimes: that
        # must not make its Lease look abandoned.
        held = lease("node-agent-restart-0", holder="node-b", duration=30)
        stale = SlotLease.parse(
            {**held.raw, "spec": {**held.raw["spec"], "renewTime": "2026-11-25T14:50:00.000000Z"}}
        )
        assert stale is not None
        quiet = QuietTimer()
        quiet.observe({stale.name: stale}, now=0.0)
        result = choose(
            {
                stale.name: stale,
                "node-agent-restart-1": lease("node-agent-restart-1", holder="node-c"),
            },
            quiet=quiet,
            now=0.0,
        )
        assert isinstance(result, NoSlot)

    def test_a_lease_without_a_duration_uses_the_default(self) -> None:
        held = lease("node-agent-restart-0", holder="node-b", duration=None)
        other = lease("node-agent-restart-1", holder="node-c", duration=10)
        quiet = QuietTimer()
        quiet.observe({held.name: held, other.name: other}, now=0.0)
        assert choose({held.name: held, other.name: other}, quiet=quiet, now=0.0) == NoSlot(10.0)


class TestParsing:
    def test_slot_leases_ignores_other_leases_and_broken_items(self) -> None:
        items: list[dict[str, Any]] = [
            {"metadata": {"name": "node-agent-restart-0", "resourceVersion": "3"}},
            {"metadata": {"name": "kube-scheduler", "resourceVersion": "4"}},
            {"metadata": {"name": "node-agent-restart-1"}},  # no resourceVersion
            {"metadata": "nonsense"},
        ]
        found = slot_leases(items, ["node-agent-restart-0", "node-agent-restart-1"])
        assert list(found) == ["node-agent-restart-0"]
        assert found["node-agent-restart-0"].holder is None

    @pytest.mark.parametrize("holder", ["", None, 5])
    def test_an_empty_holder_means_free(self, holder: object) -> None:
        raw = {
            "metadata": {"name": "x", "resourceVersion": "1"},
            "spec": {"holderIdentity": holder},
        }
        parsed = SlotLease.parse(raw)
        assert parsed is not None and parsed.holder is None


class TestBodies:
    def test_a_new_lease_is_held_by_the_node(self) -> None:
        body = new_lease("node-agent-restart-2", node="node-a", ttl=60, at=AT)
        assert body["metadata"]["name"] == "node-agent-restart-2"
        assert body["spec"] == {
            "holderIdentity": "node-a",
            "leaseDurationSeconds": 60,
            "acquireTime": "2026-11-25T15:00:00.123456Z",
            "renewTime": "2026-11-25T15:00:00.123456Z",
            "leaseTransitions": 0,
        }

    def test_taking_carries_the_version_read_and_counts_a_transition(self) -> None:
        held = lease("node-agent-restart-0", holder="node-b", rv="41")
        body = claimed(held, node="node-a", ttl=60, at=AT)
        assert body["metadata"]["resourceVersion"] == "41"
        assert body["metadata"]["uid"] == "u1"
        assert body["spec"]["holderIdentity"] == "node-a"
        assert body["spec"]["leaseTransitions"] == 1
        assert held.raw["spec"].get("holderIdentity") == "node-b"  # the read Lease is untouched

    def test_reclaiming_is_not_a_transition(self) -> None:
        mine = lease("node-agent-restart-0", holder="node-a")
        assert "leaseTransitions" not in claimed(mine, node="node-a", ttl=60, at=AT)["spec"]

    def test_renewing_changes_renew_time_only(self) -> None:
        mine = lease("node-agent-restart-0", holder="node-a", rv="9")
        body = renewed(mine, at=AT)
        assert body["metadata"]["resourceVersion"] == "9"
        assert body["spec"] == {**mine.raw["spec"], "renewTime": "2026-11-25T15:00:00.123456Z"}

    def test_releasing_clears_the_holder_and_keeps_the_version(self) -> None:
        mine = lease("node-agent-restart-0", holder="node-a", rv="9")
        body = released(mine)
        assert "holderIdentity" not in body["spec"]
        assert body["metadata"]["resourceVersion"] == "9"
