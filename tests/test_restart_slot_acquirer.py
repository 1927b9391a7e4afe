"""Seeking a slot (`SlotAcquirer`) against the test API server, with the real client: what one
attempt comes to (a claim, a retry and when, giving up on the API), the start jitter, the
backoff that never passes the time to give up, the watch that waits for a freed slot, and
cancelling it. The acquirer's clock is moved by hand; the server's audit fails any unsafe
Lease use."""

import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from kubeapi import KubeApiServer
from support.clock import ManualClock
from support.waiting import wait_until

from node_agent.kube.client import KubeApi
from node_agent.kube.model import ObjectRef
from node_agent.restart_slots.acquirer import Attempted, Claimed, GaveUp, Retry, SlotAcquirer
from node_agent.restart_slots.config import SlotConfig, SlotTiming
from node_agent.restart_slots.leases import SlotLease, new_lease, node_fraction, renewed, slot_order

NS, SLOT, NODE = "node-agent", "node-agent-restart-0", "node-a"
TTL, MAX_WAIT = 30.0, 600.0
CONFIG = SlotConfig(
    node=NODE, namespace=NS, concurrency=1, lease_ttl=TTL, max_wait=MAX_WAIT, settle=0
)
TIMING = SlotTiming(start_jitter=0.0, longest_watch=2.0, connect_timeout=1.0, read_timeout=2.0)
TIMEOUT = (1.0, 2.0)

MakeAcquirer = Callable[..., SlotAcquirer]


@pytest.fixture
def make_acquirer(agent_api: KubeApi, clock: ManualClock) -> MakeAcquirer:
    """An acquirer whose wait has begun."""

    def make(*, config: SlotConfig = CONFIG, timing: SlotTiming = TIMING) -> SlotAcquirer:
        acquirer = SlotAcquirer(
            api=agent_api,
            config=config,
            timing=timing,
            clock=clock,
            wall_clock=lambda: datetime.now(UTC),
            rng=random.Random(NODE),
        )
        acquirer.begin()
        return acquirer

    return make


def held_by(agent_api: KubeApi, node: str, slot: str = SLOT) -> None:
    body = new_lease(slot, node=node, ttl=int(TTL), at=datetime.now(UTC))
    agent_api.create_lease(NS, body, request_timeout=TIMEOUT)


def renew_as_holder(kube_api: KubeApiServer, agent_api: KubeApi) -> None:
    """What the holding node does every TTL/3."""
    lease = SlotLease.parse(kube_api.lease(NS, SLOT) or {})
    assert lease is not None
    body = renewed(lease, at=datetime.now(UTC))
    agent_api.replace_lease(ObjectRef(NS, SLOT), body, request_timeout=TIMEOUT)


def acquired(kube_api: KubeApiServer) -> list[tuple[str, str]]:
    return [(c.kind, c.new_holder) for c in kube_api.slot_timeline(NS) if c.new_holder]


def in_background(acquirer: SlotAcquirer) -> Callable[[float], Attempted]:
    """Run one attempt on a thread; the returned call waits for what it came to."""
    outcome: list[Attempted] = []
    thread = threading.Thread(target=lambda: outcome.append(acquirer.attempt()), daemon=True)
    thread.start()

    def result(timeout: float) -> Attempted:
        thread.join(timeout)
        assert outcome, f"the attempt did not end within {timeout}s"
        return outcome[0]

    return result


def watching(kube_api: KubeApiServer) -> None:
    wait_until(lambda: kube_api.open_watches() == 1, what="the acquirer's watch")


# one attempt, one claim


def test_the_first_attempt_of_a_wait_comes_after_the_start_jitter(
    kube_api: KubeApiServer, make_acquirer: MakeAcquirer, clock: ManualClock
) -> None:
    acquirer = make_acquirer(timing=SlotTiming(start_jitter=10.0))
    retry = acquirer.attempt()
    assert isinstance(retry, Retry) and 0 < retry.after <= 10.0
    assert kube_api.requests(plural="leases") == []
    clock.advance(retry.after)
    assert isinstance(acquirer.attempt(), Claimed)


def test_an_attempt_creates_a_missing_slot(
    kube_api: KubeApiServer, make_acquirer: MakeAcquirer
) -> None:
    outcome = make_acquirer().attempt()
    assert isinstance(outcome, Claimed)
    assert (outcome.lease.name, outcome.lease.holder) == (SLOT, NODE)
    assert outcome.lease.duration == int(TTL)
    assert acquired(kube_api) == [("acquire", NODE)]


def test_an_attempt_takes_a_free_slot_with_the_version_it_read(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer
) -> None:
    held_by(agent_api, "node-b")
    kube_api.release_lease(NS, SLOT)
    outcome = make_acquirer().attempt()
    assert isinstance(outcome, Claimed) and outcome.lease.holder == NODE
    assert acquired(kube_api) == [("acquire", "node-b"), ("acquire", NODE)]


def test_an_attempt_reclaims_a_slot_this_node_already_holds(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer
) -> None:
    held_by(agent_api, NODE)  # by this node's previous pod
    outcome = make_acquirer().attempt()
    assert isinstance(outcome, Claimed) and outcome.lease.holder == NODE
    assert [c.kind for c in kube_api.slot_timeline(NS)] == ["acquire", "renew"]


def test_an_attempt_that_loses_the_race_retries_within_the_conflict_backoff(
    kube_api: KubeApiServer, make_acquirer: MakeAcquirer
) -> None:
    kube_api.fail_next(409, verb="create")
    outcome = make_acquirer().attempt()
    assert isinstance(outcome, Retry)
    assert 0 <= outcome.after <= TIMING.conflict_backoff
    assert kube_api.lease(NS, SLOT) is None


def test_a_slot_whose_claim_is_refused_is_tried_last(
    kube_api: KubeApiServer, make_acquirer: MakeAcquirer
) -> None:
    first, second = slot_order(NODE, 2)
    acquirer = make_acquirer(config=replace(CONFIG, concurrency=2))
    kube_api.fail_next(403, verb="create")  # RBAC naming only some slots, say
    assert isinstance(acquirer.attempt(), Retry)
    outcome = acquirer.attempt()
    assert isinstance(outcome, Claimed) and outcome.lease.name == second
    assert kube_api.lease(NS, first) is None


# the API failing


def test_while_the_api_fails_attempts_back_off(
    kube_api: KubeApiServer, make_acquirer: MakeAcquirer
) -> None:
    acquirer = make_acquirer(timing=SlotTiming(start_jitter=0.0, retry_initial=1.0))
    kube_api.fail_next(503, times=None, verb="list")
    outcome = acquirer.attempt()
    assert isinstance(outcome, Retry) and 0 <= outcome.after <= 1.0


def test_the_api_is_given_up_on_max_wait_and_this_node_s_spread_after_the_first_failure(
    kube_api: KubeApiServer, make_acquirer: MakeAcquirer, clock: ManualClock
) -> None:
    give_up_at = clock.now + MAX_WAIT + node_fraction(NODE) * TTL
    acquirer = make_acquirer()
    kube_api.fail_next(503, times=None, verb="list")
    assert isinstance(acquirer.attempt(), Retry)
    clock.now = give_up_at - 0.01
    retry = acquirer.attempt()
    assert isinstance(retry, Retry) and retry.after <= 0.01 + 1e-9  # never past giving up
    clock.now = give_up_at
    gave_up = acquirer.attempt()
    assert isinstance(gave_up, GaveUp)
    assert gave_up.unreachable_for == pytest.approx(MAX_WAIT + node_fraction(NODE) * TTL)
    assert gave_up.problem.endswith("API answered 503 (injected fault 503 for list)")


def test_a_new_wait_counts_the_api_s_failures_afresh(
    kube_api: KubeApiServer, make_acquirer: MakeAcquirer, clock: ManualClock
) -> None:
    acquirer = make_acquirer()
    kube_api.fail_next(503, times=None, verb="list")
    assert isinstance(acquirer.attempt(), Retry)
    clock.advance(MAX_WAIT + TTL)  # past giving up, had this wait gone on
    acquirer.cancel()
    acquirer.begin()  # the next wait
    assert isinstance(acquirer.attempt(), Retry)
    clock.advance(MAX_WAIT + TTL)
    assert isinstance(acquirer.attempt(), GaveUp)


def test_an_answer_ends_the_count_of_failures(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer, clock: ManualClock
) -> None:
    held_by(agent_api, "node-b")
    acquirer = make_acquirer(timing=SlotTiming(start_jitter=0.0, longest_watch=1.0))
    kube_api.fail_next(503, verb="list")
    assert isinstance(acquirer.attempt(), Retry)
    clock.advance(MAX_WAIT)
    assert acquirer.attempt() == Retry(0.0)  # listed, every slot held: watched a while
    kube_api.fail_next(503, verb="list")
    clock.advance(TTL)
    assert isinstance(acquirer.attempt(), Retry)  # a first failure again, not given up


# watching held slots


def test_a_slot_freed_while_watching_is_claimed(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer
) -> None:
    held_by(agent_api, "node-b")
    result = in_background(make_acquirer())
    watching(kube_api)
    kube_api.release_lease(NS, SLOT)
    outcome = result(5.0)
    assert isinstance(outcome, Claimed) and outcome.lease.holder == NODE


def test_a_slot_deleted_while_watching_is_created_again(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer
) -> None:
    held_by(agent_api, "node-b")
    result = in_background(make_acquirer())
    watching(kube_api)
    kube_api.delete_lease(NS, SLOT)
    outcome = result(5.0)
    assert isinstance(outcome, Claimed) and outcome.lease.holder == NODE
    assert acquired(kube_api) == [("acquire", "node-b"), ("acquire", NODE)]


def test_renewals_seen_on_the_watch_do_not_end_it(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer
) -> None:
    held_by(agent_api, "node-b")
    result = in_background(make_acquirer(timing=SlotTiming(start_jitter=0.0, longest_watch=30.0)))
    watching(kube_api)
    kube_api.clear_requests()
    renew_as_holder(kube_api, agent_api)
    time.sleep(0.3)
    assert kube_api.requests(verb="list", plural="leases") == []
    assert kube_api.open_watches() == 1
    kube_api.release_lease(NS, SLOT)
    assert isinstance(result(5.0), Claimed)


def test_a_watch_that_ends_without_a_freed_slot_lists_again_at_once(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer
) -> None:
    held_by(agent_api, "node-b")
    acquirer = make_acquirer(timing=SlotTiming(start_jitter=0.0, longest_watch=1.0))
    assert acquirer.attempt() == Retry(0.0)
    assert [r.verb for r in kube_api.requests(plural="leases")] == ["create", "list", "watch"]


def test_cancelling_ends_the_watch_at_once_without_a_claim(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer
) -> None:
    held_by(agent_api, "node-b")
    acquirer = make_acquirer(timing=SlotTiming(start_jitter=0.0, longest_watch=30.0))
    result = in_background(acquirer)
    watching(kube_api)
    cancelled = time.monotonic()
    acquirer.cancel()
    assert result(2.0) == Retry(0.0)
    assert time.monotonic() - cancelled < 1.0
    assert acquired(kube_api) == [("acquire", "node-b")]


def test_after_cancelling_no_watch_is_followed_until_the_next_wait(
    kube_api: KubeApiServer, agent_api: KubeApi, make_acquirer: MakeAcquirer
) -> None:
    held_by(agent_api, "node-b")
    acquirer = make_acquirer(timing=SlotTiming(start_jitter=0.0, longest_watch=30.0))
    acquirer.cancel()
    started = time.monotonic()
    assert acquirer.attempt() == Retry(0.0)
    assert time.monotonic() - started < 1.0
    acquirer.begin()
    result = in_background(acquirer)
    watching(kube_api)
    kube_api.release_lease(NS, SLOT)
    assert isinstance(result(5.0), Claimed)
