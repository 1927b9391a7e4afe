"""Keeping a held slot (`SlotHolder`) against the test API server, with the real client: when
a renewal is due, what a renewal and a release come to, and how a refused write is read back
to tell an edit (still ours) from a lost slot. The holder's clock is moved by hand; the
server's audit fails any unsafe Lease use."""

from datetime import UTC, datetime

import pytest
from kubeapi import KubeApiServer
from support.clock import ManualClock

from node_agent.kube.client import KubeApi
from node_agent.kube.model import ObjectRef
from node_agent.restart_slots.config import SlotConfig, SlotTiming
from node_agent.restart_slots.holder import (
    LeftToExpire,
    Lost,
    Released,
    ReleaseFailed,
    SlotHolder,
    StillHeld,
)
from node_agent.restart_slots.leases import SlotLease, claimed, new_lease

NS, SLOT, NODE = "node-agent", "node-agent-restart-0", "node-a"
CONFIG = SlotConfig(node=NODE, namespace=NS, concurrency=1, lease_ttl=30.0, max_wait=600, settle=0)
TIMING = SlotTiming(renew_retry=1.0, connect_timeout=1.0, read_timeout=2.0)
RENEW_EVERY = 10.0  # leaseDurationSeconds 30 / 3
TIMEOUT = (1.0, 2.0)


@pytest.fixture
def holder(agent_api: KubeApi, clock: ManualClock) -> SlotHolder:
    """A holder that has just claimed the slot (created it)."""
    body = new_lease(SLOT, node=NODE, ttl=30, at=datetime.now(UTC))
    lease = SlotLease.parse(agent_api.create_lease(NS, body, request_timeout=TIMEOUT))
    assert lease is not None
    holder = SlotHolder(
        api=agent_api,
        config=CONFIG,
        timing=TIMING,
        clock=clock,
        wall_clock=lambda: datetime.now(UTC),
    )
    holder.hold(lease)
    return holder


def stored(kube_api: KubeApiServer) -> SlotLease:
    lease = SlotLease.parse(kube_api.lease(NS, SLOT) or {})
    assert lease is not None
    return lease


def holder_of(kube_api: KubeApiServer) -> str | None:
    return stored(kube_api).holder


def changes(kube_api: KubeApiServer) -> list[str]:
    return [change.kind for change in kube_api.slot_timeline(NS)]


def edit_keeping_the_holder(kube_api: KubeApiServer, agent_api: KubeApi) -> None:
    """Someone changes the Lease but leaves it ours: the version the holder has is stale."""
    current = stored(kube_api)
    agent_api.replace_lease(ObjectRef(NS, SLOT), dict(current.raw), request_timeout=TIMEOUT)


def taken_by(kube_api: KubeApiServer, agent_api: KubeApi, node: str) -> None:
    """An operator frees the slot and another node claims it."""
    kube_api.release_lease(NS, SLOT)
    body = claimed(stored(kube_api), node=node, ttl=30, at=datetime.now(UTC))
    agent_api.replace_lease(ObjectRef(NS, SLOT), body, request_timeout=TIMEOUT)


# holding


def test_a_claimed_slot_is_renewed_a_third_of_its_ttl_later(
    holder: SlotHolder, clock: ManualClock
) -> None:
    assert holder.slot == SLOT
    assert holder.renew_at == clock.now + RENEW_EVERY


def test_a_dropped_slot_is_no_longer_held(holder: SlotHolder) -> None:
    holder.drop()
    assert holder.slot is None


# renewing


def test_a_renewal_stores_the_lease_and_schedules_the_next(
    kube_api: KubeApiServer, holder: SlotHolder, clock: ManualClock
) -> None:
    clock.advance(RENEW_EVERY)
    assert holder.renew() == StillHeld()
    assert holder.renew_at == clock.now + RENEW_EVERY
    # The next renewal carries the version the last one stored: no 409, no read-back.
    clock.advance(RENEW_EVERY)
    assert holder.renew() == StillHeld()
    assert changes(kube_api) == ["acquire", "renew", "renew"]
    assert kube_api.requests(verb="list", plural="leases") == []
    assert holder_of(kube_api) == NODE


def test_a_renewal_of_a_slot_edited_by_someone_reads_it_back_and_renews_at_once(
    kube_api: KubeApiServer, agent_api: KubeApi, holder: SlotHolder, clock: ManualClock
) -> None:
    edit_keeping_the_holder(kube_api, agent_api)
    assert holder.renew() == StillHeld()  # 409, read back: still ours
    assert holder.renew_at == clock.now
    assert holder.renew() == StillHeld()  # from the version read
    assert holder.renew_at == clock.now + RENEW_EVERY
    assert changes(kube_api) == ["acquire", "renew", "renew"]


def test_a_renewal_of_a_slot_an_operator_released_finds_it_lost(
    kube_api: KubeApiServer, holder: SlotHolder
) -> None:
    kube_api.release_lease(NS, SLOT)
    assert holder.renew() == Lost(SLOT, holder=None)
    assert holder_of(kube_api) is None  # not taken back


def test_a_renewal_of_a_slot_another_node_took_finds_it_lost_to_that_node(
    kube_api: KubeApiServer, agent_api: KubeApi, holder: SlotHolder
) -> None:
    taken_by(kube_api, agent_api, "node-b")
    assert holder.renew() == Lost(SLOT, holder="node-b")
    assert holder_of(kube_api) == "node-b"


def test_a_renewal_of_a_deleted_slot_finds_it_lost(
    kube_api: KubeApiServer, holder: SlotHolder
) -> None:
    kube_api.delete_lease(NS, SLOT)
    assert holder.renew() == Lost(SLOT, holder=None)
    assert kube_api.lease(NS, SLOT) is None  # not created again


def test_a_renewal_without_an_answer_is_tried_again_soon(
    kube_api: KubeApiServer, holder: SlotHolder, clock: ManualClock
) -> None:
    kube_api.fail_next(503, verb="update")
    assert holder.renew() == StillHeld()
    assert holder.renew_at == clock.now + TIMING.renew_retry
    assert holder.renew() == StillHeld()
    assert changes(kube_api) == ["acquire", "renew"]


def test_a_refused_renewal_that_cannot_be_read_back_is_tried_again_soon(
    kube_api: KubeApiServer, holder: SlotHolder, clock: ManualClock
) -> None:
    kube_api.fail_next(409, verb="update")
    kube_api.fail_next(503, verb="list")
    assert holder.renew() == StillHeld()
    assert holder.renew_at == clock.now + TIMING.renew_retry
    assert holder_of(kube_api) == NODE


# releasing


def test_a_release_clears_the_holder(kube_api: KubeApiServer, holder: SlotHolder) -> None:
    assert holder.release(final=False) == Released(SLOT)
    assert holder_of(kube_api) is None
    assert changes(kube_api) == ["acquire", "release"]


def test_releasing_a_deleted_slot_counts_as_released(
    kube_api: KubeApiServer, holder: SlotHolder
) -> None:
    kube_api.delete_lease(NS, SLOT)
    assert holder.release(final=False) == Released(SLOT)
    assert kube_api.lease(NS, SLOT) is None


def test_a_release_without_an_answer_is_tried_again_soon_while_the_lease_lives(
    kube_api: KubeApiServer, holder: SlotHolder, clock: ManualClock
) -> None:
    clock.advance(29.0)
    kube_api.fail_next(503, verb="update")
    assert holder.release(final=False) == ReleaseFailed(retry_at=clock.now + TIMING.renew_retry)
    assert holder_of(kube_api) == NODE


def test_a_release_without_an_answer_after_the_lease_expired_leaves_it_to_expire(
    kube_api: KubeApiServer, holder: SlotHolder, clock: ManualClock
) -> None:
    clock.advance(30.0)  # lease_ttl since the claim, never renewed
    kube_api.fail_next(503, verb="update")
    assert holder.release(final=False) == LeftToExpire()


def test_a_renewal_restarts_the_lease_s_life(
    kube_api: KubeApiServer, holder: SlotHolder, clock: ManualClock
) -> None:
    clock.advance(20.0)
    assert holder.renew() == StillHeld()
    clock.advance(20.0)  # 40 s after the claim, 20 s after the renewal
    kube_api.fail_next(503, verb="update")
    assert isinstance(holder.release(final=False), ReleaseFailed)


def test_the_last_release_on_stop_is_one_quick_try(
    kube_api: KubeApiServer, holder: SlotHolder
) -> None:
    kube_api.fail_next(409, verb="update")
    assert holder.release(final=True) == LeftToExpire()
    assert kube_api.requests(verb="list", plural="leases") == []  # no read-back
    assert holder_of(kube_api) == NODE


def test_a_release_from_a_stale_version_reads_the_slot_back_and_releases_it_next_time(
    kube_api: KubeApiServer, agent_api: KubeApi, holder: SlotHolder, clock: ManualClock
) -> None:
    edit_keeping_the_holder(kube_api, agent_api)
    assert holder.release(final=False) == StillHeld()
    assert holder_of(kube_api) == NODE
    assert holder.release(final=False) == Released(SLOT)
    assert holder_of(kube_api) is None


def test_a_release_of_a_slot_another_node_took_finds_it_lost(
    kube_api: KubeApiServer, agent_api: KubeApi, holder: SlotHolder
) -> None:
    taken_by(kube_api, agent_api, "node-b")
    assert holder.release(final=False) == Lost(SLOT, holder="node-b")
    assert holder_of(kube_api) == "node-b"
