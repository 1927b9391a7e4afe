"""`--recover-stuck-pods` in `node-agent run`: the flags, what a pass hands over, and the
daemon in-process against the test API server (tests/kubeapi.py): a pod that failed to pull
before the Secret was fixed is evicted within seconds after; with the flag off no pod is ever
asked about."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from kubeapi import KubeApiServer
from support.agent import StartAgent
from support.node import REGISTRY, NodeTree
from support.settings import (
    NODE_NAME,
    create_secret,
)
from support.waiting import wait_until

from node_agent.cli import build_parser, daemon_settings_from, main
from node_agent.credentials import RegistryAuth
from node_agent.daemon.outcomes import applied_changes
from node_agent.errors import RestartFailed
from node_agent.ownership import StateStore
from node_agent.reconcile import NodeFile, Reconciler
from node_agent.settings import DaemonSettings
from node_agent.stuck_pods.recovery import CREDENTIALS_ON_NODE, RECOVERED
from node_agent.targets.containerd import ContainerdFormat
from node_agent.targets.kubelet import KubeletFormat

IMAGE = f"{REGISTRY}/team/app:1.0"

# --- the command line -----------------------------------------------------------------------


def parse_run(*args: str, env: dict[str, str] | None = None) -> DaemonSettings:
    environ = {"POD_NAMESPACE": "node-agent", **(env or {})}
    return daemon_settings_from(build_parser(environ).parse_args(["run", *args]))


def test_recovery_is_off_by_default_and_on_by_flag_or_environment() -> None:
    base = ("--secret", "ns/creds", "--node-name", "n1")
    assert parse_run(*base).recover_stuck_pods is False
    on = parse_run(*base, "--recover-stuck-pods")
    assert (on.recover_stuck_pods, on.recover_stuck_pods_rate) == (True, 10)
    from_env = parse_run(
        *base,
        env={"NODE_AGENT_RECOVER_STUCK_PODS": "true", "NODE_AGENT_RECOVER_STUCK_PODS_RATE": "3"},
    )
    assert (from_env.recover_stuck_pods, from_env.recover_stuck_pods_rate) == (True, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--secret-file", "s.json", "--restart-concurrency", "0", "--node-name", "n1"),
            "--recover-stuck-pods needs an API source: --secret or --fallback-secret",
        ),
        (
            ("--secret", "ns/creds", "--no-events", "--restart-concurrency", "0"),
            "--recover-stuck-pods needs this node's name: --node-name (or NODE_NAME)",
        ),
        (
            ("--secret", "ns/creds", "--node-name", "n1", "--once"),
            "--recover-stuck-pods needs the running daemon, not --once",
        ),
        (
            ("--secret", "ns/creds", "--node-name", "n1", "--recover-stuck-pods-rate", "0"),
            "--recover-stuck-pods-rate takes a whole number from 1 to 1000",
        ),
    ],
)
def test_recovery_without_what_it_needs_is_a_one_line_usage_error(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--recover-stuck-pods", *args], environ={"POD_NAMESPACE": "x"})
    assert code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("node-agent") and "error:" in last_line
    assert message in last_line


# --- what a pass hands over -----------------------------------------------------------------


class ScriptedContainerd:
    """A containerd whose restarts come back healthy or not, in the order given."""

    def __init__(self, *healthy: bool) -> None:
        self.healthy = list(healthy)

    def restart_and_verify(self) -> None:
        if not self.healthy.pop(0):
            raise RestartFailed("CRI did not answer")


def reconciler(tmp_path: Path, containerd: ScriptedContainerd | None = None) -> Reconciler:
    files = [
        NodeFile(ContainerdFormat(), tmp_path / "config.toml", restarts_containerd=True),
        NodeFile(KubeletFormat(), tmp_path / "config.json"),
    ]
    return Reconciler(
        node_files=files, state_store=StateStore(tmp_path / "state"), containerd=containerd
    )


CREDENTIALS = {"reg.example:5000": RegistryAuth("u", "p"), "docker.io": RegistryAuth("u", "p")}


def test_a_pass_hands_over_each_registry_it_wrote_per_target(tmp_path: Path) -> None:
    outcome = reconciler(tmp_path).reconcile(CREDENTIALS)
    assert sorted(
        (c.target, c.registry, c.restart, c.replaced, c.at)
        for c in applied_changes(outcome, at=5.0)
    ) == [
        ("containerd", "docker.io", "not_needed", False, 5.0),
        ("containerd", "reg.example:5000", "not_needed", False, 5.0),
        ("kubelet", "docker.io", "not_needed", False, 5.0),
        ("kubelet", "reg.example:5000", "not_needed", False, 5.0),
    ]


def test_a_rotation_is_handed_over_as_replaced_and_a_pass_that_wrote_nothing_hands_nothing(
    tmp_path: Path,
) -> None:
    reconciler(tmp_path).reconcile(CREDENTIALS)
    rotated = reconciler(tmp_path).reconcile({**CREDENTIALS, "docker.io": RegistryAuth("u", "2")})
    assert {(c.target, c.registry, c.replaced) for c in applied_changes(rotated, at=6.0)} == {
        ("containerd", "docker.io", True),
        ("kubelet", "docker.io", True),
    }
    assert applied_changes(reconciler(tmp_path).reconcile(CREDENTIALS), at=7.0) != []
    assert applied_changes(reconciler(tmp_path).reconcile(CREDENTIALS), at=8.0) == []


@pytest.mark.parametrize(
    ("healthy", "state"),
    [((True,), "healthy"), ((False, True), "failed"), ((False, False), "failed")],
    ids=["restarted healthy", "rolled back", "failed"],
)
def test_containerds_changes_carry_how_its_restart_went(
    tmp_path: Path, healthy: tuple[bool, ...], state: str
) -> None:
    subject = reconciler(tmp_path, ScriptedContainerd(*healthy))
    outcome = subject.reconcile({"reg.example": RegistryAuth("u", "p")})
    by_target = {c.target: c.restart for c in applied_changes(outcome, at=1.0)}
    assert by_target == {"containerd": state, "kubelet": "not_needed"}


def test_containerds_file_held_back_for_a_restart_hands_over_only_kubelets_change(
    tmp_path: Path,
) -> None:
    subject = reconciler(tmp_path, ScriptedContainerd(True))
    outcome = subject.reconcile({"reg.example": RegistryAuth("u", "p")}, may_restart=False)
    assert [c.target for c in applied_changes(outcome, at=1.0)] == ["kubelet"]


# --- the daemon -----------------------------------------------------------------------------

def pod_requests(kube_api: KubeApiServer) -> list[str]:
    return [
        f"{r.verb} {r.path}"
        for r in kube_api.requests()
        if r.plural is not None and r.plural.startswith("pods")
    ]


@pytest.mark.parametrize("restart", [False, True], ids=["reload none", "containerd restarted"])
def test_a_pod_that_failed_to_pull_before_the_secret_was_fixed_is_evicted_within_seconds(
    kube_api: KubeApiServer,
    start_agent: StartAgent,
    restart: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.stuck_pods")
    kube_api.create_pod("team", "app-1", node=NODE_NAME, image=IMAGE, waiting="ErrImagePull")
    kube_api.create_pod("team", "solo", node=NODE_NAME, image=IMAGE, controller=None)
    kube_api.create_pod("team", "elsewhere", node="node-2", image=IMAGE)
    agent = start_agent(recover_stuck_pods=True, restart=restart)
    wait_until(lambda: agent.get("/readyz")[0] == 200, what="ready with no Secret yet")
    assert kube_api.evictions() == []

    create_secret(kube_api, "Pa55-fixed")

    wait_until(kube_api.evictions, 5.0, "app-1 evicted within 5 s of the Secret's fix")
    assert agent.node.passwords() == ("Pa55-fixed", "Pa55-fixed")
    assert kube_api.evictions() == [("team", "app-1")]
    wait_until(lambda: kube_api.events("team", reason=RECOVERED), what="ImagePullRecovered")
    wait_until(lambda: kube_api.events("team", reason=CREDENTIALS_ON_NODE), what="solo told")
    assert agent.metric("node_agent_stuck_pods_recovered_total", result="evicted") == 1
    assert agent.metric("node_agent_stuck_pods_recovered_total", result="skipped_unowned") == 1
    assert {p["metadata"]["name"] for p in kube_api.pods()} == {"solo", "elsewhere"}
    assert "Pa55" not in str(kube_api.events())
    (evicted,) = [r.getMessage() for r in caplog.records if "evicted team/app-1" in r.getMessage()]
    assert REGISTRY in evicted and IMAGE in evicted and "effective on this node now" in evicted
    assert "Pa55" not in caplog.text


def test_with_only_config_json_managed_the_daemon_waits_for_kubelets_cache(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    kube_api.create_pod("team", "app-1", node=NODE_NAME, image=IMAGE)
    agent = start_agent(recover_stuck_pods=True, targets=("kubelet",))
    create_secret(kube_api, "Pa55-fixed")
    wait_until(lambda: node.kubelet_password() == "Pa55-fixed", what="config.json written")
    agent.wait_idle()
    time.sleep(0.5)  # a recovery acting at once would have listed the pods by now
    assert pod_requests(kube_api) == []
    assert kube_api.evictions() == []


def test_with_the_flag_off_the_daemon_makes_no_pod_request_at_all(
    kube_api: KubeApiServer, start_agent: StartAgent
) -> None:
    kube_api.create_pod("team", "app-1", node=NODE_NAME, image=IMAGE)
    agent = start_agent(recover_stuck_pods=False)
    create_secret(kube_api, "Pa55-fixed")
    agent.wait_for_passwords("Pa55-fixed")
    agent.wait_idle()
    assert pod_requests(kube_api) == []
    assert kube_api.evictions() == []
    assert "node_agent_stuck_pods_recovered_total" not in {name for name, _ in agent.metrics()}
