"""`node-agent run` on a real containerd, pulling from a real htpasswd registry, following a
Secret served by the test API server (tests/kubeapi.py).

Nothing but the Secret changes between the pulls: the daemon sees the change through its
watch, writes config.toml and config.json, restarts containerd and checks CRI. A pull with no
credentials in the request then succeeds, which only containerd's `configs."HOST".auth` can
explain.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.containerd import ContainerdNode
from integration.oci_image import PushedImage
from integration.registry import AuthRegistry
from node_agent.cri import CriError

# The test API server lives with the unit tests; `tests/` is not a package.
_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))
from kubeapi import KubeApiServer  # noqa: E402
from support.dockerconfig import registry_login  # noqa: E402

pytestmark = pytest.mark.integration

NS = "kube-system"
NAME = "registry-credentials"
DOCKERCONFIG = "kubernetes.io/dockerconfigjson"
PULL_DEADLINE = 30.0


def dockerconfig(registry: AuthRegistry, password: str) -> dict[str, bytes]:
    return registry_login(registry.host, password, username=registry.username)


def pull(node: ContainerdNode, image: PushedImage) -> str:
    """Pull with no credentials in the request: "ok", or the CRI error's details."""
    try:
        with node.cri(timeout=10) as cri:
            if cri.image_present(image.reference):
                cri.remove_image(image.reference)
            cri.pull_image(image.reference)
    except CriError as error:
        return error.details
    return "ok"


def wait_for_pull(node: ContainerdNode, image: PushedImage) -> float:
    """Seconds until a credential-less pull succeeds."""
    started = time.monotonic()
    while (result := pull(node, image)) != "ok":
        assert time.monotonic() - started < PULL_DEADLINE, f"pull still fails: {result}"
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[KubeApiServer]:
    with KubeApiServer(kubeconfig_path=tmp_path / "kubeconfig", bookmark_interval=0.5) as server:
        yield server


@pytest.fixture
def agent(
    containerd_node: ContainerdNode, kube_api: KubeApiServer, tmp_path: Path
) -> Iterator[subprocess.Popen[str]]:
    assert kube_api.kubeconfig_path is not None
    (tmp_path / "kubelet").mkdir()
    log = (tmp_path / "agent.log").open("w")
    command = [
        sys.executable,
        "-m",
        "node_agent",
        "run",
        "--secret",
        f"{NS}/{NAME}",
        "--kubeconfig",
        str(kube_api.kubeconfig_path),
        "--node-name",
        "node-1",
        "--containerd-config",
        str(containerd_node.config_path),
        "--kubelet-config",
        str(tmp_path / "kubelet/config.json"),
        "--state-dir",
        str(tmp_path / "state"),
        "--containerd-socket",
        str(containerd_node.socket_path),
        "--reload",
        "command",
        "--reload-command",
        containerd_node.restart_command,
        "--reload-timeout",
        "20s",
        "--min-reload-interval",
        "1s",
        # One node: the one restart slot is its own (integration/test_restart_slots.py shares).
        "--restart-lease-namespace",
        NS,
        "--restart-settle",
        "0s",
        "--metrics-address",
        "127.0.0.1:0",
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        finally:
            process.kill()
            log.close()
    assert process.returncode == 0, (tmp_path / "agent.log").read_text()


def test_a_secret_created_and_rotated_through_the_api_is_what_containerd_pulls_with(
    agent: subprocess.Popen[str],
    kube_api: KubeApiServer,
    containerd_node: ContainerdNode,
    auth_registry: AuthRegistry,
    pushed_image: PushedImage,
    tmp_path: Path,
) -> None:
    assert "401 Unauthorized" in pull(containerd_node, pushed_image)

    kube_api.create_secret(
        NS, NAME, dockerconfig(auth_registry, auth_registry.password), type=DOCKERCONFIG
    )
    wait_for_pull(containerd_node, pushed_image)
    kubelet = json.loads((tmp_path / "kubelet/config.json").read_text())
    assert auth_registry.host in kubelet["auths"]

    auth_registry.rotate_password("rotated-Pa55")
    assert "401 Unauthorized" in pull(containerd_node, pushed_image)
    kube_api.update_secret(NS, NAME, dockerconfig(auth_registry, "rotated-Pa55"))
    wait_for_pull(containerd_node, pushed_image)

    log = (tmp_path / "agent.log").read_text()
    assert "rotated-Pa55" not in log and auth_registry.password not in log
    assert agent.poll() is None
