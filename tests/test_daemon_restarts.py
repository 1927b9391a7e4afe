"""When the daemon restarts containerd: once for a burst of changes, at most once per
`--min-reload-interval` (the restart gate), and a restart that fails is rolled back and
retried at that pace, never in a loop. First the gate on its own, with a fake clock; then
`node-agent run` in this process (the `start_agent` fixture), restarting a fake containerd
through a script whose log says when each restart ran."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kubeapi import KubeApiServer
from prometheus_client import CollectorRegistry
from support.agent import StartAgent
from support.dockerconfig import docker_config, login, registry_login
from support.events import RecordedEvents
from support.node import NodeTree
from support.settings import NAME, NS, create_secret, update_secret
from support.waiting import wait_until

from node_agent.daemon.credential_sources import CredentialSources
from node_agent.daemon.reporting import DaemonReporter, Readiness
from node_agent.daemon.restarts import RestartGate
from node_agent.daemon.work_queue import Batch, WorkQueue
from node_agent.daemon.worker import START, Worker
from node_agent.errors import RestartFailed
from node_agent.metrics import AgentMetrics
from node_agent.ownership import StateStore
from node_agent.reconcile import NodeFile, Reconciler
from node_agent.status_server import Health
from node_agent.targets.containerd import ContainerdFormat

# --- the restart gate -------------------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyContainerd:
    """A containerd whose restarts succeed or fail in the order given."""

    def __init__(self, results: list[bool]) -> None:
        self.results = results

    def restart_and_verify(self) -> None:
        if not self.results.pop(0):
            raise RestartFailed("CRI did not answer")


def test_every_attempt_closes_the_gate_for_the_interval_failed_ones_too(tmp_path: Path) -> None:
    clock = Clock()
    gate = RestartGate(min_interval=30, clock=clock)
    secret_file = tmp_path / "secret.json"
    secret_file.write_bytes(docker_config({"reg.example": login("pw")}))
    config_toml = NodeFile(ContainerdFormat(), tmp_path / "config.toml", restarts_containerd=True)
    store = StateStore(tmp_path / "state")
    reconciler = Reconciler([config_toml], store, FlakyContainerd([False, True]), clock=clock)
    worker = Worker(
        queue=WorkQueue(debounce=0.0, clock=clock),
        sources=CredentialSources(files=[secret_file]),
        reconciler=reconciler,
        reporter=DaemonReporter(
            metrics=AgentMetrics(CollectorRegistry(), process=False),
            events=RecordedEvents(),
            readiness=Readiness(Health(), CredentialSources()),
        ),
        readiness=Readiness(Health(), CredentialSources()),
        health=Health(),
        gate=gate,
        clock=clock,
    )
    assert gate.is_open()
    report = worker.handle(Batch(frozenset({START})))
    assert report is not None and (report.result, report.restart) == ("error", "rolled_back")
    assert not gate.is_open()
    clock.now += 29.9
    assert not gate.is_open()
    clock.now += 0.1
    assert gate.is_open()


# --- in the running daemon --------------------------------------------------------------------


def test_a_burst_of_100_updates_costs_a_handful_of_passes_and_one_restart(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "initial")
    agent = start_agent(restart=True)
    agent.wait_for_passwords("initial")
    wait_until(lambda: node.restarts() == 1, what="the restart for the initial credentials")
    # The pass that restarted has been reported (the one before it waited for the slot).
    wait_until(
        lambda: agent.metric("node_agent_containerd_restarts_total", result="success") == 1,
        timeout=10,
        what="the restart reported",
    )
    before = agent.passes()

    for version in range(100):
        update_secret(kube_api, f"burst-{version}")

    wait_until(lambda: node.kubelet_password() == "burst-99", what="kubelet follows at once")
    assert node.containerd_password() == "initial"  # restarted less than 1 s ago
    agent.wait_for_passwords("burst-99", timeout=3)
    agent.wait_idle()
    assert node.restarts() == 2  # the start, then exactly one for the whole burst
    assert agent.passes() - before <= 8
    assert agent.metric("node_agent_containerd_restarts_total", result="success") == 2
    assert agent.metric("node_agent_in_sync", target="containerd") == 1


def test_restarts_are_rate_limited_and_changes_during_the_wait_coalesce(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "one")
    agent = start_agent(restart=True)
    agent.wait_for_passwords("one")
    update_secret(kube_api, "two")
    wait_until(lambda: node.kubelet_password() == "two")
    # The metric follows the pass's writes: wait for the pass to be reported.
    wait_until(lambda: agent.metric("node_agent_in_sync", target="containerd") == 0)
    assert node.containerd_password() == "one"
    update_secret(kube_api, "three")
    agent.wait_for_passwords("three")
    agent.wait_idle()
    first, second = node.restart_times()  # "two" never needed a restart of its own
    assert second - first == pytest.approx(1.0, abs=0.1)


def test_a_restart_that_fails_is_rolled_back_and_retried_once_per_interval(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "pw")
    agent = start_agent(restart=True)
    agent.wait_for_passwords("pw")
    update_secret(kube_api, "pw")  # no change: no restart
    kube_api.update_secret(NS, NAME, registry_login("broken.example", "pw"))
    wait_until(
        lambda: agent.metric("node_agent_containerd_restarts_total", result="rolled_back") == 1,
        what="first rollback",
    )
    time.sleep(2.3)
    rolled_back = agent.metric("node_agent_containerd_restarts_total", result="rolled_back")
    assert 2 <= rolled_back <= 4  # once per second at most, never a loop
    assert "broken.example" not in node.config_toml.read_text()
    assert node.kubelet_password("broken.example") == "pw"  # needs no restart
    (event,) = agent.events("ContainerdRestartRolledBack")
    assert event["type"] == "Warning" and event["count"] >= 2
    assert agent.metric("node_agent_reconcile_total", result="error") >= 2
