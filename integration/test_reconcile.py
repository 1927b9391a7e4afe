"""`node-agent reconcile` on a real containerd pulling from a real htpasswd registry.

Every pull goes through CRI `ImageService/PullImage` with **no credentials in the request**:
the only way it can succeed is containerd's own `configs."HOST".auth`, i.e. what the agent
wrote. The agent runs as a separate process, exactly as an operator would run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from integration.containerd import CRI_PLUGIN, ContainerdNode
from integration.oci_image import PushedImage
from integration.registry import AuthRegistry
from node_agent.cri import CriError

pytestmark = pytest.mark.integration


class Agent:
    """Runs `node-agent reconcile` against one containerd node and a Secret file."""

    def __init__(self, node: ContainerdNode, workdir: Path) -> None:
        self.node = node
        self.secret = workdir / "secret.json"
        self.kubelet_config = workdir / "kubelet/config.json"
        self.state_dir = workdir / "state"
        self.kubelet_config.parent.mkdir()

    def write_secret(self, auths: dict[str, dict[str, str]]) -> None:
        self.secret.write_text(json.dumps({"auths": auths}))

    def reconcile(self, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            "-m",
            "node_agent",
            "reconcile",
            "--secret-file",
            str(self.secret),
            "--containerd-config",
            str(self.node.config_path),
            "--kubelet-config",
            str(self.kubelet_config),
            "--state-dir",
            str(self.state_dir),
            "--containerd-socket",
            str(self.node.socket_path),
            "--reload",
            "command",
            "--reload-command",
            self.node.restart_command,
            "--reload-timeout",
            "20s",
            *extra,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def agent(containerd_node: ContainerdNode, tmp_path: Path) -> Agent:
    return Agent(containerd_node, tmp_path)


def pull(node: ContainerdNode, image: PushedImage) -> str:
    """Pull with no credentials in the request; return the error code or "ok"."""
    with node.cri() as cri:
        if cri.image_present(image.reference):
            cri.remove_image(image.reference)
        try:
            cri.pull_image(image.reference)
        except CriError as error:
            assert "401 Unauthorized" in error.details, error.details
            return "401"
    return "ok"


def credentials_for(
    registry: AuthRegistry, password: str | None = None
) -> dict[str, dict[str, str]]:
    return {
        registry.host: {"username": registry.username, "password": password or registry.password}
    }


def test_pull_fails_before_and_succeeds_after_one_reconcile(
    agent: Agent, auth_registry: AuthRegistry, pushed_image: PushedImage
) -> None:
    assert pull(agent.node, pushed_image) == "401"
    agent.write_secret(credentials_for(auth_registry))
    result = agent.reconcile()
    assert result.returncode == 0, result.stderr
    assert "containerd: restarted, CRI answering" in result.stdout
    assert pull(agent.node, pushed_image) == "ok"
    assert auth_registry.host in json.loads(agent.kubelet_config.read_text())["auths"]
    assert auth_registry.password not in result.stdout + result.stderr


def test_the_rest_of_the_realistic_config_survives(
    agent: Agent, auth_registry: AuthRegistry
) -> None:
    before = tomllib.loads(agent.node.config_path.read_text())
    agent.write_secret(credentials_for(auth_registry))
    assert agent.reconcile().returncode == 0
    after = tomllib.loads(agent.node.config_path.read_text())
    configs = after["plugins"][CRI_PLUGIN]["registry"].pop("configs")
    before["plugins"][CRI_PLUGIN]["registry"].pop("configs")
    assert after == before
    assert set(configs) == {auth_registry.host}


def test_a_second_reconcile_restarts_nothing(agent: Agent, auth_registry: AuthRegistry) -> None:
    agent.write_secret(credentials_for(auth_registry))
    assert agent.reconcile().returncode == 0
    pid = agent.node.pid()
    result = agent.reconcile()
    assert result.returncode == 0
    assert "restarted" not in result.stdout
    assert agent.node.pid() == pid


def test_password_rotation_follows_the_secret(
    agent: Agent, auth_registry: AuthRegistry, pushed_image: PushedImage
) -> None:
    agent.write_secret(credentials_for(auth_registry))
    assert agent.reconcile().returncode == 0
    auth_registry.rotate_password("rotated-Pa55")
    assert pull(agent.node, pushed_image) == "401"
    agent.write_secret(credentials_for(auth_registry, "rotated-Pa55"))
    assert agent.reconcile().returncode == 0
    assert pull(agent.node, pushed_image) == "ok"


def test_registry_removed_from_the_secret_means_401_again(
    agent: Agent, auth_registry: AuthRegistry, pushed_image: PushedImage
) -> None:
    original = agent.node.config_path.read_text()
    agent.write_secret(credentials_for(auth_registry))
    assert agent.reconcile().returncode == 0
    assert pull(agent.node, pushed_image) == "ok"
    agent.write_secret({})
    assert agent.reconcile().returncode == 0
    assert agent.node.config_path.read_text() == original
    assert pull(agent.node, pushed_image) == "401"


def test_a_restart_that_leaves_containerd_dead_is_rolled_back(
    agent: Agent, auth_registry: AuthRegistry, pushed_image: PushedImage
) -> None:
    original = agent.node.config_path.read_text()
    agent.write_secret(credentials_for(auth_registry))
    agent.node.break_next_restart()
    result = agent.reconcile("--reload-timeout", "3s")
    assert result.returncode == 1
    assert "previous config.toml restored and containerd restarted healthy" in result.stderr
    assert result.stderr.count("node-agent: error:") == 1
    assert agent.node.config_path.read_text() == original
    assert agent.node.cri_ready()
    assert pull(agent.node, pushed_image) == "401"


def test_the_secret_kubectl_prints_works_end_to_end(
    agent: Agent, auth_registry: AuthRegistry, pushed_image: PushedImage
) -> None:
    manifest = subprocess.run(
        [
            "kubectl",
            "create",
            "secret",
            "docker-registry",
            "pull",
            f"--docker-server={auth_registry.host}",
            f"--docker-username={auth_registry.username}",
            f"--docker-password={auth_registry.password}",
            "--dry-run=client",
            "-o",
            "yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    agent.secret.write_text(manifest)
    assert agent.reconcile().returncode == 0
    assert pull(agent.node, pushed_image) == "ok"
