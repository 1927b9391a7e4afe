"""Stuck-pod recovery against the test API server (tests/kubeapi.py) through the real
`kubernetes` client, on a clock the tests move: which pods are evicted and when, what the
others get, and the bounds (once per pod, a rate per minute, retries after a 429)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from kubeapi import KubeApiServer
from prometheus_client import CollectorRegistry
from support.clock import ManualClock

from node_agent.kube.client import KubeApi
from node_agent.metrics import AgentMetrics
from node_agent.stuck_pods.decisions import (
    KUBELET_CREDENTIAL_CACHE_SECONDS,
    AppliedChange,
    RestartState,
)
from node_agent.stuck_pods.recovery import (
    CREDENTIALS_ON_NODE,
    FAILED_AGAIN,
    RECOVERED,
    RecoveryTiming,
    StuckPodRecovery,
)

NODE = "node-1"
REGISTRY = "reg.example:5000"
IMAGE = f"{REGISTRY}/team/app:1.0"
TIMING = RecoveryTiming(retry_initial=2.0, retry_max=8.0, follow_up=60.0, give_up_after=600.0)


@dataclass
class Recovery:
    """The recovery under test and what it talks to."""

    recovery: StuckPodRecovery
    kube_api: KubeApiServer
    clock: ManualClock
    metrics: AgentMetrics

    def applied(
        self,
        target: str = "containerd",
        *,
        registry: str = REGISTRY,
        restart: RestartState = "not_needed",
    ) -> None:
        """A pass wrote `registry` into `target` now."""
        change = AppliedChange(
            target=target, registry=registry, at=self.clock.now, replaced=False, restart=restart
        )
        self.recovery.credentials_applied([change])

    def step(self, after: float = 0.0) -> float | None:
        self.clock.advance(after)
        return self.recovery.run_due()

    def run_until_idle(self, *, limit: int = 200) -> None:
        """Step to every time the recovery asks for, until it asks for none."""
        for _ in range(limit):
            next_at = self.recovery.run_due()
            if next_at is None:
                return
            self.clock.now = max(self.clock.now, next_at)
        raise AssertionError("the recovery never went idle")

    def evicted(self) -> list[str]:
        return [name for _, name in self.kube_api.evictions()]

    def counted(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "node_agent_stuck_pods_recovered_total", {"result": result}
        )
        return value or 0.0

    def events(self, reason: str) -> list[str]:
        return [e["involvedObject"]["name"] for e in self.kube_api.events(reason=reason)]

    def pod_requests(self) -> list[str]:
        return [
            f"{r.verb} {r.plural}"
            for r in self.kube_api.requests()
            if r.plural is not None and r.plural.startswith("pods")
        ]


MakeRecovery = Callable[..., Recovery]


@pytest.fixture
def make_recovery(kube_api: KubeApiServer) -> Iterator[MakeRecovery]:
    """Makes a recovery for NODE through the real client, on a clock of its own."""
    clients: list[KubeApi] = []

    def make(*, rate: int = 10) -> Recovery:
        assert kube_api.kubeconfig_path is not None
        api = KubeApi.connect(kubeconfig=kube_api.kubeconfig_path, environ={})
        clients.append(api)
        clock = ManualClock()
        metrics = AgentMetrics(CollectorRegistry(), process=False)
        metrics.add_stuck_pod_recovery()
        recovery = StuckPodRecovery(
            api=api,
            node=NODE,
            rate_per_minute=rate,
            metrics=metrics,
            timing=TIMING,
            clock=clock,
            rng=random.Random(7),
        )
        return Recovery(recovery, kube_api, clock, metrics)

    yield make
    for api in clients:
        api.close()


@pytest.fixture
def recovery(make_recovery: MakeRecovery) -> Recovery:
    return make_recovery()


def stuck(kube_api: KubeApiServer, name: str, **options: object) -> str:
    options.setdefault("node", NODE)
    options.setdefault("image", IMAGE)
    return kube_api.create_pod("team", name, **options)  # type: ignore[arg-type]


# --- who is evicted -------------------------------------------------------------------------


def test_pods_stuck_on_the_registry_that_became_effective_are_evicted_and_no_others(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "backing-off")
    stuck(kube_api, "err-pull", waiting="ErrImagePull", controller="StatefulSet/db")
    stuck(
        kube_api,
        "init-stuck",
        waiting="PodInitializing",
        init_image=IMAGE,
        init_waiting="ErrImagePull",
        controller="Job/migrate",
    )
    stuck(kube_api, "other-registry", image="other.example/app:1")
    stuck(kube_api, "other-node", node="node-2")
    stuck(kube_api, "running", waiting=None)
    stuck(kube_api, "unowned", controller=None)

    recovery.applied(restart="healthy")
    recovery.run_until_idle()

    assert sorted(recovery.evicted()) == ["backing-off", "err-pull", "init-stuck"]
    assert sorted(recovery.events(RECOVERED)) == ["backing-off", "err-pull", "init-stuck"]
    assert recovery.events(CREDENTIALS_ON_NODE) == ["unowned"]
    assert {p["metadata"]["name"] for p in kube_api.pods()} == {
        "other-registry",
        "other-node",
        "running",
        "unowned",
    }
    assert (recovery.counted("evicted"), recovery.counted("skipped_unowned")) == (3, 1)
    assert recovery.counted("refused") == 0
    assert "list pods" in recovery.pod_requests()


def test_the_event_on_an_unowned_pod_says_the_credentials_are_there_and_deleting_it_retries(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "unowned", controller=None)
    recovery.applied(restart="healthy")
    recovery.run_until_idle()

    (event,) = kube_api.events(reason=CREDENTIALS_ON_NODE)
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "Pod"
    assert event["metadata"]["namespace"] == "team"
    assert REGISTRY in event["message"] and NODE in event["message"]
    assert "Deleting it" in event["message"] and "at once" in event["message"]


def test_a_docker_hub_image_is_recovered_when_docker_hub_credentials_become_effective(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "hub", image="team/app:1.0")
    stuck(kube_api, "wildcard", image="a.example.com/app")
    recovery.applied(registry="docker.io", restart="healthy")
    recovery.applied(registry="*.example.com", restart="healthy")
    recovery.run_until_idle()
    assert sorted(recovery.evicted()) == ["hub", "wildcard"]


def test_a_pod_is_evicted_once_and_a_pod_without_controller_told_once_across_changes(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "unowned", controller=None)
    recovery.applied(restart="healthy")
    recovery.run_until_idle()
    recovery.applied(restart="healthy")
    recovery.run_until_idle()
    assert recovery.events(CREDENTIALS_ON_NODE) == ["unowned"]
    assert recovery.counted("skipped_unowned") == 1


def test_a_replacement_whose_pull_fails_again_is_reported_and_left_to_kubelet(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "app-1")
    recovery.applied(restart="healthy")
    assert recovery.step() is not None  # a follow-up round is due
    assert recovery.evicted() == ["app-1"]

    stuck(kube_api, "app-2")  # the ReplicaSet's replacement, failing again
    recovery.run_until_idle()

    assert recovery.evicted() == ["app-1"]
    assert recovery.events(FAILED_AGAIN) == ["app-2"]
    assert recovery.counted("evicted") == 1


# --- when -----------------------------------------------------------------------------------


def test_nothing_happens_before_kubelet_has_read_a_config_json_only_change(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "app-1")
    recovery.applied("kubelet")

    next_at = recovery.step()
    assert next_at == recovery.clock.now + KUBELET_CREDENTIAL_CACHE_SECONDS
    recovery.step(after=KUBELET_CREDENTIAL_CACHE_SECONDS - 1)
    assert recovery.pod_requests() == [] and recovery.evicted() == []

    recovery.step(after=1)
    assert recovery.evicted() == ["app-1"]


def test_a_containerd_change_whose_restart_failed_never_recovers_anything(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "app-1")
    recovery.applied(restart="failed")
    assert recovery.step() is None
    recovery.step(after=3600)
    assert recovery.pod_requests() == [] and recovery.evicted() == []


# --- bounds and retries ---------------------------------------------------------------------


def test_an_eviction_a_disruption_budget_refuses_is_retried_with_backoff_until_it_succeeds(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "guarded")
    kube_api.forbid_eviction("team", "guarded", times=2)
    recovery.applied(restart="healthy")

    recovery.run_until_idle()

    assert recovery.evicted() == ["guarded"]
    assert recovery.counted("refused") == 2 and recovery.counted("evicted") == 1
    assert len(kube_api.requests(verb="create", plural="pods/eviction")) == 3


def test_a_failed_pod_list_is_retried(kube_api: KubeApiServer, recovery: Recovery) -> None:
    stuck(kube_api, "app-1")
    kube_api.fail_next(503, verb="list")
    recovery.applied(restart="healthy")
    retry_at = recovery.step()
    assert recovery.evicted() == [] and retry_at is not None
    recovery.run_until_idle()
    assert recovery.evicted() == ["app-1"]


def test_at_most_the_rate_of_evictions_per_minute_with_a_hundred_stuck_pods(
    kube_api: KubeApiServer, make_recovery: MakeRecovery
) -> None:
    for index in range(100):
        stuck(kube_api, f"app-{index:03}")
    subject = make_recovery(rate=10)
    subject.applied(restart="healthy")
    evicted_at: list[float] = []
    for _ in range(50):
        before = len(subject.evicted())
        next_at = subject.recovery.run_due()
        evicted_at += [subject.clock.now] * (len(subject.evicted()) - before)
        if next_at is None:
            break
        subject.clock.now = max(subject.clock.now, next_at)

    assert len(subject.evicted()) == 100
    assert len(set(subject.evicted())) == 100
    for start in evicted_at:
        in_a_minute = [at for at in evicted_at if start <= at < start + 60]
        assert len(in_a_minute) <= 10
    assert evicted_at[-1] - evicted_at[0] >= 9 * 60  # ten minutes' budgets, no faster


def test_a_window_closes_after_give_up_after_with_work_left(
    kube_api: KubeApiServer, recovery: Recovery
) -> None:
    stuck(kube_api, "guarded")
    kube_api.forbid_eviction("team", "guarded", times=10_000)
    recovery.applied(restart="healthy")
    recovery.run_until_idle()
    assert recovery.evicted() == []
    assert recovery.clock.now <= 1000.0 + TIMING.give_up_after + TIMING.retry_max
