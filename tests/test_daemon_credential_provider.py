"""`node-agent run --targets credential-provider`: a Secret rotation reaches the plugin's very
next answer, and nothing is restarted; a new registry says the kubelet must restart."""

import json
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fake_systemd import systemd_on_private_bus
from kubeapi import KubeApiServer
from support.agent import Agent, start_in_process
from support.dockerconfig import DOCKERCONFIG, registry_login
from support.kubelet_credential_provider import config_errors, request, response_errors, run_plugin
from support.node import REGISTRY, NodeTree
from support.settings import (
    NAME,
    NODE_NAME,
    NS,
    RESTART_SCRIPT,
    agent_settings,
    create_secret,
    fast_timings,
    restart_script_command,
    update_secret,
)
from support.waiting import wait_until

from node_agent.targets.credential_provider import PLUGIN_NAME, RESPONSE_NAME

V1 = "credentialprovider.kubelet.k8s.io/v1"
NODE_FILES = Path(__file__).parents[1] / "daemonset/credential-provider/node-files"


StartAgent = Callable[..., Agent]


@pytest.fixture
def start_agent(
    tmp_path: Path, kube_api: KubeApiServer, cri_socket: str
) -> Iterator[StartAgent]:
    """Start a daemon with only the credential-provider target, and a restart command that
    counts containerd restarts (it must never run)."""
    node = NodeTree.create(tmp_path / "node")
    (node.root / "bin").mkdir()
    script = tmp_path / "restart.sh"
    script.write_text(RESTART_SCRIPT)
    script.chmod(0o755)
    running: list[Agent] = []

    def start(
        *,
        match_images: str = "registries",
        recover_stuck_pods: bool = False,
        provisioned: bool = False,
        system_bus: Path | None = None,
    ) -> Agent:
        if provisioned:
            for name in (PLUGIN_NAME, RESPONSE_NAME):
                shutil.copy2(NODE_FILES / name, node.root / "bin" / name)
            shutil.copy2(NODE_FILES / "config.yaml", node.root / "provider-config.yaml")
        restart = restart_script_command(node, script)
        settings = agent_settings(node, kube_api, cri_socket=cri_socket, restart_command=restart)
        node_settings = replace(
            settings.node,
            targets=("credential-provider",),
            credential_provider_bin_dir=node.root / "bin",
            credential_provider_config=node.root / "provider-config.yaml",
            credential_provider_match_images=match_images,
            system_bus_socket=system_bus or node.root / "no-system-bus",
        )
        settings = replace(settings, node=node_settings, recover_stuck_pods=recover_stuck_pods)
        running.append(start_in_process(settings, node, kube_api, fast_timings()))
        return running[-1]

    yield start
    for agent in running:
        agent.stop()


@pytest.fixture
def agent(start_agent: StartAgent) -> Agent:
    return start_agent()


def plugin_password(agent: Agent) -> str | None:
    """What the plugin answers for the registry right now, asked as the kubelet asks."""
    plugin = agent.node.root / "bin" / PLUGIN_NAME
    if not plugin.exists():
        return None
    result = run_plugin(plugin, request(f"{REGISTRY}/app:1"))
    if result.returncode != 0:
        return None
    assert response_errors(result.stdout, api_version=V1) == []
    auth = json.loads(result.stdout)["auth"]
    return auth[REGISTRY]["password"] if REGISTRY in auth else None


def answers(agent: Agent, password: str) -> Callable[[], bool]:
    return lambda: plugin_password(agent) == password


def all_in_sync(agent: Agent) -> bool:
    targets = [f"credential-provider-{name}" for name in ("response", "plugin", "config")]
    return all(agent.metric("node_agent_in_sync", target=t) == 1 for t in targets)


def plugin_stdout(agent: Agent) -> bytes:
    return run_plugin(agent.node.root / "bin" / PLUGIN_NAME, request(f"{REGISTRY}/app:1")).stdout


def test_a_rotation_reaches_the_next_plugin_answer_with_no_restart(
    kube_api: KubeApiServer, agent: Agent
) -> None:
    create_secret(kube_api, "pw-first")
    wait_until(lambda: plugin_password(agent) == "pw-first", timeout=5, what="first answer")
    config = agent.node.root / "provider-config.yaml"
    config_before = config.read_bytes()
    assert config_errors(config.read_text(), bin_dir=agent.node.root / "bin") == []
    for password in ("pw-second", "pw-third"):
        update_secret(kube_api, password)
        wait_until(answers(agent, password), timeout=5, what=password)
    assert config.read_bytes() == config_before  # same registries: the kubelet needs nothing
    assert agent.node.restarts() == 0 and agent.node.restart_attempts() == []
    assert agent.metric("node_agent_containerd_restarts_total", result="success") == 0
    wait_until(lambda: all_in_sync(agent), timeout=5)
    assert "pw-" not in json.dumps(kube_api.events())


def test_a_deleted_secret_takes_the_credentials_out_of_the_answer(
    kube_api: KubeApiServer, agent: Agent
) -> None:
    create_secret(kube_api, "pw-gone-soon")
    wait_until(lambda: plugin_password(agent) == "pw-gone-soon", timeout=5)
    kube_api.delete_secret(NS, NAME)
    wait_until(lambda: json.loads(plugin_stdout(agent)).get("auth") == {}, timeout=5)
    assert b"pw-gone-soon" not in plugin_stdout(agent)


def test_a_new_registry_changes_the_provider_entry_and_says_the_kubelet_must_restart(
    kube_api: KubeApiServer, agent: Agent
) -> None:
    create_secret(kube_api, "pw")
    wait_until(lambda: plugin_password(agent) == "pw", timeout=5)
    # The entry was added: reported once the pass is over, the Event sent in the background.
    wait_until(lambda: agent.metric("node_agent_kubelet_restart_needed") == 1, timeout=5)
    wait_until(lambda: agent.events("KubeletRestartNeeded"), timeout=5)
    assert "restart the kubelet" in agent.events("KubeletRestartNeeded")[0]["message"]
    auths = {REGISTRY: {"username": "u", "password": "pw"}, "new.example": {"auth": "dTpw"}}
    body = {".dockerconfigjson": json.dumps({"auths": auths}).encode()}
    kube_api.update_secret(NS, NAME, body)
    config = agent.node.root / "provider-config.yaml"
    wait_until(lambda: '"new.example"' in config.read_text(), timeout=5)
    assert plugin_password(agent) == "pw"


def test_a_tampered_response_and_a_deleted_plugin_are_put_back(
    kube_api: KubeApiServer, agent: Agent
) -> None:
    create_secret(kube_api, "pw-kept")
    wait_until(lambda: plugin_password(agent) == "pw-kept", timeout=5)
    bin_dir = agent.node.root / "bin"
    response = bin_dir / RESPONSE_NAME
    response.write_text(response.read_text().replace("pw-kept", "pw-planted"))
    wait_until(lambda: plugin_password(agent) == "pw-kept", timeout=5, what="response repaired")
    (bin_dir / PLUGIN_NAME).unlink()
    wait_until(lambda: plugin_password(agent) == "pw-kept", timeout=5, what="plugin back")
    assert stat.S_IMODE((bin_dir / PLUGIN_NAME).stat().st_mode) == 0o755
    repaired = "node_agent_drift_repairs_total"
    wait_until(
        lambda: agent.metric(repaired, target="credential-provider-response") == 1
        and agent.metric(repaired, target="credential-provider-plugin") == 1,
        timeout=5,
    )


def test_a_pod_stuck_on_the_registry_is_evicted_once_the_plugin_answers_for_it(
    kube_api: KubeApiServer, start_agent: StartAgent
) -> None:
    # The node was provisioned with the node files of daemonset/credential-provider: the
    # kubelet asks the plugin about every image, and the response alone makes the
    # credentials effective.
    # (A registry without a port: the patterns for all images cover it.)
    image = "portless.example/team/app:1"
    kube_api.create_pod("team", "app-1", node=NODE_NAME, image=image, waiting="ErrImagePull")
    agent = start_agent(match_images="all", recover_stuck_pods=True, provisioned=True)
    secret = registry_login("portless.example", "pw-fixed")
    kube_api.create_secret(NS, NAME, secret, type=DOCKERCONFIG)
    wait_until(kube_api.evictions, 5.0, "app-1 evicted once the plugin answers")
    assert kube_api.evictions() == [("team", "app-1")]
    assert b"pw-fixed" in plugin_stdout(agent)
    assert agent.metric("node_agent_kubelet_restart_needed") == 0


def test_a_registry_new_to_the_kubelet_config_is_not_acted_on_before_the_kubelet_restarts(
    kube_api: KubeApiServer, start_agent: StartAgent
) -> None:
    image = f"{REGISTRY}/team/app:1"
    kube_api.create_pod("team", "app-1", node=NODE_NAME, image=image, waiting="ErrImagePull")
    agent = start_agent(match_images="registries", recover_stuck_pods=True)
    create_secret(kube_api, "pw-fixed")
    wait_until(lambda: plugin_password(agent) == "pw-fixed", timeout=5)
    agent.wait_idle()
    time.sleep(0.5)  # a recovery acting on it would have evicted by now
    assert kube_api.evictions() == []


def test_the_restart_needed_gauge_clears_once_systemd_says_the_kubelet_restarted(
    kube_api: KubeApiServer, start_agent: StartAgent, tmp_path: Path
) -> None:
    kubelet = {"known_units": frozenset({"kubelet.service"})}
    started = {"kubelet.service": time.time() - 3600}
    with systemd_on_private_bus(tmp_path / "bus", **kubelet, active_since=started) as systemd:
        agent = start_agent(system_bus=tmp_path / "bus" / "bus")
        create_secret(kube_api, "pw-1")
        wait_until(lambda: agent.metric("node_agent_kubelet_restart_needed") == 1, 5)
        systemd.active_since["kubelet.service"] = time.time()  # the operator restarted it
        update_secret(kube_api, "pw-2")  # the next pass asks again
        wait_until(lambda: agent.metric("node_agent_kubelet_restart_needed") == 0, 5)
        assert len(agent.events("KubeletRestartNeeded")) == 1
