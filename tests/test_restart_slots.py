"""Restart slots against the test API server, with the real `kubernetes` client: at most N
nodes restart containerd at once, a slot is taken from another node only once its Lease has
stayed unchanged for its duration on the taker's own clock, a failed restart keeps its slot,
and a long API outage ends in a restart without a slot.

The server audits every Lease change (tests/kubeapi.py `RestartSlotAudit`): a slot taken
while still renewed, a node on two slots, an update without resourceVersion or a patch fails
the test at teardown.
"""

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
from kubeapi import KubeApiServer
from support.waiting import wait_until

from node_agent.kube.client import KubeApi
from node_agent.kube.model import ObjectRef
from node_agent.restart_slots.coordinator import RestartSlots, SlotConfig, SlotTiming
from node_agent.restart_slots.leases import new_lease, slot_order
from node_agent.restart_slots.machine import SlotState

NS = "node-agent"
FAST = SlotTiming(
    start_jitter=0.05,
    longest_watch=2.0,
    conflict_backoff=0.05,
    retry_initial=0.05,
    retry_max=0.2,
    renew_retry=0.1,
    connect_timeout=1.0,
    read_timeout=2.0,
)




@dataclass
class Reports:
    """A `SlotReporter` that remembers what it was told."""

    calls: list[str] = field(default_factory=list)
    pending: int = 0

    def restart_queued(self, *, slots: int, namespace: str) -> None:
        self.calls.append("queued")
        self.pending = 1

    def restart_wait_over(self) -> None:
        self.calls.append("wait over")
        self.pending = 0

    def restart_slot_acquired(self, slot: str, *, waited: float) -> None:
        self.calls.append(f"acquired {slot}")
        self.pending = 0

    def restart_failed_open(self, *, unreachable_for: float, problem: str) -> None:
        self.calls.append("failed open")
        self.pending = 0

    def restart_slot_kept(self, slot: str, *, namespace: str) -> None:
        self.calls.append(f"kept {slot}")

    def restart_slot_released(self, slot: str) -> None:
        self.calls.append(f"released {slot}")

    def restart_slot_lost(self, slot: str, *, holder: str | None) -> None:
        self.calls.append(f"lost {slot} to {holder}")


@dataclass
class Agent:
    """One node's restart slot, as the daemon's worker uses it."""

    node: str
    slots: RestartSlots
    reports: Reports
    granted: threading.Event

    def wait_for_slot(self, timeout: float = 10.0) -> None:
        assert self.granted.wait(timeout), f"{self.node}: no slot within {timeout}s"
        self.granted.clear()
        assert self.slots.may_restart()

    def state(self) -> SlotState:
        return self.slots.state

    def restarted(self, result: str = "success") -> None:
        self.slots.pass_done(restart=result, containerd_in_sync=result == "success", failed=False)


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent(kube_api: KubeApiServer) -> Iterator[AgentFactory]:
    agents: list[Agent] = []
    apis: list[KubeApi] = []

    def make(
        node: str,
        *,
        concurrency: int = 1,
        ttl: float = 2.0,
        settle: float = 0.0,
        max_wait: float = 600.0,
        wall_offset: timedelta = timedelta(0),
        timing: SlotTiming = FAST,
    ) -> Agent:
        assert kube_api.kubeconfig_path is not None
        api = KubeApi.connect(kubeconfig=kube_api.kubeconfig_path, environ={})
        apis.append(api)
        reports, granted = Reports(), threading.Event()
        slots = RestartSlots(
            api=api,
            config=SlotConfig(
                node=node,
                namespace=NS,
                concurrency=concurrency,
                lease_ttl=ttl,
                max_wait=max_wait,
                settle=settle,
            ),
            reporter=reports,
            on_granted=granted.set,
            timing=timing,
            wall_clock=lambda: datetime.now(UTC) + wall_offset,
            rng=random.Random(node),
        )
        agent = Agent(node, slots, reports, granted)
        agents.append(agent)
        slots.start()
        return agent

    yield make
    for agent in agents:
        assert agent.slots.stop(timeout=5.0), f"{agent.node}: slot thread did not stop"
    for api in apis:
        api.close()


def holder(kube_api: KubeApiServer, slot: str = "node-agent-restart-0") -> str | None:
    lease = kube_api.lease(NS, slot)
    return None if lease is None else lease["spec"].get("holderIdentity")


class TestOneNode:
    def test_a_request_creates_the_slot_lease_and_grants_it(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a")
        assert not agent.slots.may_restart()
        agent.slots.request()
        agent.wait_for_slot()
        assert holder(kube_api) == "node-a"
        lease = kube_api.lease(NS, "node-agent-restart-0")
        assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 2
        assert agent.reports.calls == ["queued", "acquired node-agent-restart-0"]

    def test_a_healthy_restart_gives_the_slot_back_after_the_settle_delay(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", settle=0.5)
        agent.slots.request()
        agent.wait_for_slot()
        agent.restarted("success")
        assert agent.state() is SlotState.SETTLING
        assert not agent.slots.may_restart()
        time.sleep(0.3)
        assert holder(kube_api) == "node-a"
        wait_until(lambda: holder(kube_api) is None, timeout=10.0)
        # The state turns idle once the release call has returned, a moment after the
        # API server has stored it.
        wait_until(lambda: agent.state() is SlotState.IDLE, timeout=2.0)

    def test_the_slot_is_renewed_while_held(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=1.0)  # renew every 1/3 s
        agent.slots.request()
        agent.wait_for_slot()
        time.sleep(1.2)
        renewals = [c for c in kube_api.slot_timeline(NS) if c.kind == "renew"]
        assert len(renewals) >= 2

    def test_a_wait_that_is_no_longer_needed_ends(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        other = make_agent("node-b")
        other.slots.request()
        other.wait_for_slot()
        agent = make_agent("node-a")
        agent.slots.request()
        wait_until(lambda: agent.reports.pending == 1, timeout=10.0)
        agent.slots.pass_done(restart=None, containerd_in_sync=True, failed=False)
        assert agent.state() is SlotState.IDLE
        assert agent.reports.pending == 0
        other.restarted()
        time.sleep(0.5)
        assert not agent.granted.is_set()

    def test_a_pass_that_failed_before_restarting_gives_the_slot_back(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        # A broken node file on this node is not a bad change: others may go on.
        agent = make_agent("node-a")
        agent.slots.request()
        agent.wait_for_slot()
        agent.slots.pass_done(restart=None, containerd_in_sync=False, failed=True)
        wait_until(lambda: holder(kube_api) is None, timeout=10.0)

    def test_stopping_gives_back_a_slot_held_for_a_healthy_restart(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", settle=60.0)
        agent.slots.request()
        agent.wait_for_slot()
        agent.restarted("success")
        assert agent.slots.stop(timeout=3.0)
        assert holder(kube_api) is None


class TestSharingSlots:
    def test_a_second_node_waits_until_the_first_releases(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        first, second = make_agent("node-a", ttl=30.0), make_agent("node-b", ttl=30.0)
        first.slots.request()
        first.wait_for_slot()
        second.slots.request()
        wait_until(lambda: second.reports.pending == 1, timeout=10.0)
        time.sleep(0.5)
        assert not second.granted.is_set()
        first.restarted()
        second.wait_for_slot(timeout=5.0)  # woken by the watch, well before the TTL
        assert holder(kube_api) == "node-b"

    def test_a_replacement_pod_on_the_same_node_reclaims_its_slot_at_once(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        before = make_agent("node-a", ttl=30.0)
        before.slots.request()
        before.wait_for_slot()
        before.restarted("rolled_back")  # kept: the old pod dies holding it
        assert before.slots.stop(timeout=3.0)
        assert holder(kube_api) == "node-a"
        replacement = make_agent("node-a", ttl=30.0)
        replacement.slots.request()
        replacement.wait_for_slot(timeout=3.0)

    def test_fifty_nodes_share_three_slots(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        kube_api.slot_audit.max_holders = 3
        agents = [make_agent(f"node-{i:02d}", concurrency=3, ttl=5.0) for i in range(50)]
        restarting: set[str] = set()
        most_at_once = 0
        lock = threading.Lock()

        def restart(agent: Agent) -> None:
            nonlocal most_at_once
            agent.slots.request()
            agent.wait_for_slot(timeout=60.0)
            with lock:
                restarting.add(agent.node)
                most_at_once = max(most_at_once, len(restarting))
            time.sleep(0.02)  # containerd restarting
            with lock:
                restarting.discard(agent.node)
            agent.restarted()

        threads = [threading.Thread(target=restart, args=(agent,)) for agent in agents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads), "not every node finished"
        assert most_at_once <= 3
        acquired = [c for c in kube_api.slot_timeline(NS) if c.kind in ("acquire", "takeover")]
        assert sorted({c.new_holder for c in acquired}) == sorted(a.node for a in agents)
        wait_until(lambda: all(a.state() is SlotState.IDLE for a in agents), timeout=10.0)

    def test_a_released_slot_draws_few_claims_and_waiting_nodes_ignore_renewals(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        long_watch = replace(FAST, longest_watch=30.0)
        first = make_agent("node-first", ttl=6.0, timing=long_watch)  # renews every 2 s
        first.slots.request()
        first.wait_for_slot()
        waiting = [make_agent(f"node-{i}", ttl=6.0, timing=long_watch) for i in range(10)]
        for agent in waiting:
            agent.slots.request()
        wait_until(lambda: all(a.reports.pending == 1 for a in waiting), timeout=10.0)
        time.sleep(0.3)
        kube_api.clear_requests()
        time.sleep(2.5)  # a renewal, well before the slot could expire
        assert kube_api.requests(verb="update", plural="leases")
        assert kube_api.requests(verb="list", plural="leases") == []
        holder_now = first
        for _ in range(3):
            kube_api.clear_requests()
            holder_now.restarted()
            wait_until(lambda: sum(a.granted.is_set() for a in waiting) == 1, timeout=10.0)
            holder_now = next(a for a in waiting if a.granted.is_set())
            holder_now.wait_for_slot()
            waiting.remove(holder_now)
            claims = kube_api.requests(verb="update", plural="leases")
            # Without the head start every waiting node would claim (10, 9, 8); allow some
            # that fire before the winner's change reaches them, and the renewals.
            assert len(claims) <= len(waiting) // 2 + 2, len(claims)


class TestAbandonedSlots:
    def test_a_slot_is_taken_from_a_silent_holder_only_after_its_ttl(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        # A holder that stopped renewing (killed mid-restart): created here, never renewed.
        assert kube_api.kubeconfig_path is not None
        api = KubeApi.connect(kubeconfig=kube_api.kubeconfig_path, environ={})
        dead = new_lease("node-agent-restart-0", node="node-dead", ttl=2, at=datetime.now(UTC))
        api.create_lease(NS, dead, request_timeout=(1, 2))
        api.close()
        agent = make_agent("node-a", ttl=2.0)
        asked = time.monotonic()
        agent.slots.request()
        agent.wait_for_slot(timeout=10.0)
        assert time.monotonic() - asked >= 2.0
        takeover = [c for c in kube_api.slot_timeline(NS) if c.kind == "takeover"]
        assert [(c.old_holder, c.new_holder) for c in takeover] == [("node-dead", "node-a")]

    @pytest.mark.parametrize("offset", [timedelta(minutes=10), timedelta(minutes=-10)])
    def test_clock_offsets_never_make_a_renewed_slot_look_free(
        self, kube_api: KubeApiServer, make_agent: AgentFactory, offset: timedelta
    ) -> None:
        holder_agent = make_agent("node-a", ttl=1.0, wall_offset=-offset)
        holder_agent.slots.request()
        holder_agent.wait_for_slot()
        waiting = [make_agent(f"node-{i}", ttl=1.0, wall_offset=offset) for i in range(3)]
        for agent in waiting:
            agent.slots.request()
        time.sleep(3.5)  # three and a half TTLs of a long restart
        assert not any(agent.granted.is_set() for agent in waiting)
        assert holder(kube_api) == "node-a"
        holder_agent.restarted()
        wait_until(lambda: any(agent.granted.is_set() for agent in waiting), timeout=5.0)
        assert holder(kube_api) in {agent.node for agent in waiting}


class TestFailedRestarts:
    def test_a_failed_restart_keeps_the_slot_and_stops_the_rollout(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        bad, next_node = make_agent("node-a", ttl=1.0), make_agent("node-b", ttl=1.0)
        bad.slots.request()
        bad.wait_for_slot()
        bad.restarted("rolled_back")
        assert bad.state() is SlotState.KEPT
        assert bad.slots.may_restart()  # its next attempt needs no new slot
        assert bad.reports.calls[-1] == "kept node-agent-restart-0"
        next_node.slots.request()
        time.sleep(2.5)  # more than two TTLs: still renewed
        assert not next_node.granted.is_set()
        bad.restarted("success")  # a later good change
        next_node.wait_for_slot(timeout=5.0)

    def test_an_operator_can_release_a_kept_slot(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        bad, next_node = make_agent("node-a", ttl=1.0), make_agent("node-b", ttl=1.0)
        bad.slots.request()
        bad.wait_for_slot()
        bad.restarted("failed")
        next_node.slots.request()
        kube_api.release_lease(NS, "node-agent-restart-0")
        next_node.wait_for_slot(timeout=5.0)
        wait_until(lambda: bad.state() is SlotState.IDLE, timeout=10.0)
        assert "lost node-agent-restart-0 to node-b" in bad.reports.calls or (
            "lost node-agent-restart-0 to None" in bad.reports.calls
        )

    def test_a_kept_slot_is_given_back_when_no_restart_is_needed_any_more(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        # The bad change was reverted: containerd runs the desired config again.
        bad = make_agent("node-a", ttl=1.0)
        bad.slots.request()
        bad.wait_for_slot()
        bad.restarted("rolled_back")
        bad.slots.pass_done(restart=None, containerd_in_sync=False, failed=True)
        assert bad.state() is SlotState.KEPT
        bad.slots.pass_done(restart=None, containerd_in_sync=True, failed=False)
        wait_until(lambda: holder(kube_api) is None, timeout=10.0)


class TestApiOutages:
    def test_an_outage_longer_than_max_wait_restarts_without_a_slot(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=1.0, max_wait=1.0)
        kube_api.set_outage(True)
        started = time.monotonic()
        agent.slots.request()
        agent.wait_for_slot(timeout=10.0)
        # max-wait, plus this node's place in the spread (under one TTL)
        assert 1.0 <= time.monotonic() - started < 1.0 + 1.0 + 1.0
        assert agent.state() is SlotState.UNCOORDINATED
        assert "failed open" in agent.reports.calls
        kube_api.set_outage(False)
        agent.restarted()
        assert agent.state() is SlotState.IDLE

    def test_a_shorter_outage_waits_for_the_api(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=1.0, max_wait=30.0)
        kube_api.set_outage(True)
        agent.slots.request()
        time.sleep(1.0)
        assert not agent.granted.is_set()
        kube_api.set_outage(False)
        agent.wait_for_slot(timeout=5.0)
        assert agent.state() is SlotState.HOLDING
        assert holder(kube_api) == "node-a"

    def test_a_slot_that_cannot_be_claimed_is_tried_last(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        kube_api.fail_next(403, times=1, verb="create")  # e.g. RBAC naming only some slots
        agent = make_agent("node-a", concurrency=2)
        first_choice = slot_order("node-a", 2)[0]
        agent.slots.request()
        agent.wait_for_slot(timeout=5.0)
        assert agent.slots.held_slot not in (None, first_choice)

    def test_forbidden_leases_end_in_a_restart_without_a_slot_after_max_wait(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        kube_api.fail_next(403, times=None, verb="list")  # the Role is missing
        agent = make_agent("node-a", ttl=1.0, max_wait=1.0)
        agent.slots.request()
        agent.wait_for_slot(timeout=10.0)
        assert agent.state() is SlotState.UNCOORDINATED


class TestTheSlotThread:
    """What the thread does in each state, beyond the machine's table
    (tests/test_restart_slot_machine.py): when it renews, releases, retries and stops."""

    def test_stopping_gives_back_a_slot_held_for_a_restart_under_way(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=30.0)
        agent.slots.request()
        agent.wait_for_slot()
        assert agent.slots.stop(timeout=3.0)
        assert holder(kube_api) is None
        assert agent.reports.calls[-1] == "released node-agent-restart-0"

    def test_stopping_ends_a_wait_at_once_and_says_so(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        other = make_agent("node-b", ttl=30.0)
        other.slots.request()
        other.wait_for_slot()
        agent = make_agent("node-a", ttl=30.0, timing=replace(FAST, longest_watch=30.0))
        agent.slots.request()
        wait_until(lambda: kube_api.open_watches() == 1, timeout=5.0)
        stopping = time.monotonic()
        assert agent.slots.stop(timeout=3.0)
        assert time.monotonic() - stopping < 1.0
        assert agent.reports.calls == ["queued", "wait over"]
        assert holder(kube_api) == "node-b"

    def test_a_restart_requested_while_settling_waits_for_a_slot_again(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=30.0, settle=0.3)
        agent.slots.request()
        agent.wait_for_slot()
        agent.restarted()
        agent.slots.request()  # a newer change, while settling
        assert agent.state() is SlotState.SETTLING
        agent.wait_for_slot(timeout=5.0)
        assert [c.kind for c in kube_api.slot_timeline(NS)] == ["acquire", "release", "acquire"]
        assert agent.reports.calls.count("queued") == 2
        assert agent.reports.calls[-1] == "acquired node-agent-restart-0"

    def test_a_slot_lost_while_settling_with_a_restart_requested_is_sought_again(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=1.0, settle=30.0)
        agent.slots.request()
        agent.wait_for_slot()
        agent.restarted()
        agent.slots.request()
        kube_api.release_lease(NS, "node-agent-restart-0")  # an operator
        agent.wait_for_slot(timeout=5.0)
        assert "lost node-agent-restart-0 to None" in agent.reports.calls
        assert agent.state() is SlotState.HOLDING
        assert holder(kube_api) == "node-a"

    def test_a_release_without_an_answer_is_tried_again_soon(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=30.0)
        agent.slots.request()
        agent.wait_for_slot()
        kube_api.fail_next(503, verb="update")
        agent.restarted()
        took = wait_until(lambda: holder(kube_api) is None, timeout=5.0)
        assert took < 2.0  # renew_retry (0.1 s), not the TTL
        wait_until(lambda: agent.state() is SlotState.IDLE, timeout=2.0)
        assert agent.reports.calls.count("released node-agent-restart-0") == 1

    def test_a_renewal_without_an_answer_keeps_the_slot_and_is_tried_again_soon(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=3.0)  # renew every second
        agent.slots.request()
        agent.wait_for_slot()
        kube_api.fail_next(503, verb="update")
        failed = time.monotonic()
        wait_until(
            lambda: any(c.kind == "renew" for c in kube_api.slot_timeline(NS)),
            timeout=5.0,
        )
        assert time.monotonic() - failed < 2.0  # 1 s to the renewal, then renew_retry
        assert agent.state() is SlotState.HOLDING
        assert agent.reports.calls == ["queued", "acquired node-agent-restart-0"]

    def test_a_slot_someone_edited_but_left_ours_stays_held_and_renewed(
        self, kube_api: KubeApiServer, make_agent: AgentFactory
    ) -> None:
        agent = make_agent("node-a", ttl=3.0)  # renew every second
        agent.slots.request()
        agent.wait_for_slot()
        assert kube_api.kubeconfig_path is not None
        api = KubeApi.connect(kubeconfig=kube_api.kubeconfig_path, environ={})
        lease = kube_api.lease(NS, "node-agent-restart-0")
        assert lease is not None
        edited = {**lease, "metadata": {**lease["metadata"], "labels": {"edited": "yes"}}}
        api.replace_lease(ObjectRef(NS, "node-agent-restart-0"), edited, request_timeout=(1, 2))
        api.close()
        edited_at = len(kube_api.slot_timeline(NS))
        time.sleep(2.5)  # two renewals' worth
        assert agent.state() is SlotState.HOLDING
        assert holder(kube_api) == "node-a"
        since_the_edit = [c.kind for c in kube_api.slot_timeline(NS)][edited_at:]
        assert len(since_the_edit) >= 2 and set(since_the_edit) == {"renew"}
        assert agent.reports.calls == ["queued", "acquired node-agent-restart-0"]
