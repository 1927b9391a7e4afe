"""`node-agent run --targets credential-provider`: a Secret rotation reaches the plugin's very
next answer, and nothing is restarted; a new registry says the kubelet must restart."""

import json
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from daemon_harness import (
    NAME,
    NS,
    REGISTRY,
    RESTART_SCRIPT,
    Agent,
    Node,
    agent_settings,
    create_secret,
    start_daemon,
    update_secret,
)
from kubeapi import KubeApiServer
from support.kubelet_credential_provider import config_errors, request, response_errors, run_plugin
from support.waiting import wait_until

from node_agent.targets.credential_provider import PLUGIN_NAME, RESPONSE_NAME

V1 = "credentialprovider.kubelet.k8s.io/v1"


@pytest.fixture
def agent(tmp_path: Path, kube_api: KubeApiServer, cri_socket: str) -> Iterator[Agent]:
    """A daemon with only the credential-provider target, and a restart command that counts
    containerd restarts (it must never run)."""
    node = Node.create(tmp_path / "node")
    (node.root / "bin").mkdir()
    script = tmp_path / "restart.sh"
    script.write_text(RESTART_SCRIPT)
    script.chmod(0o755)
    settings = agent_settings(node, kube_api, cri_socket=cri_socket, restart_script=script)
    node_settings = replace(
        settings.node,
        targets=("credential-provider",),
        credential_provider_bin_dir=node.root / "bin",
        credential_provider_config=node.root / "provider-config.yaml",
    )
    running = Agent(start_daemon(replace(settings, node=node_settings)), node, kube_api)
    yield running
    running.stop()


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
