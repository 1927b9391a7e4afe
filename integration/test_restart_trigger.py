"""`--reload trigger` on a real containerd: the agent asks, the host's script (as the systemd
path unit of daemonset/restart-trigger/ would run it) restarts containerd, the agent checks
CRI and rolls back a restart that leaves containerd dead, as with every other restart mode.

The host's `systemctl restart containerd.service` is played by the test containerd's own
control script (the one `--reload command` uses in the other integration tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.containerd import ContainerdNode
from integration.oci_image import PushedImage
from integration.registry import AuthRegistry
from integration.test_reconcile import credentials_for, pull

_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))
from test_restart_trigger import Host  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def host(containerd_node: ContainerdNode, tmp_path: Path) -> Iterator[Host]:
    directory, bin_dir = tmp_path / "run-node-agent", tmp_path / "bin"
    directory.mkdir(mode=0o700)
    bin_dir.mkdir()
    node = Host(directory, bin_dir, restart=containerd_node.restart_command)
    node.start_path_unit()
    yield node
    node.stop()


def reconcile(
    node: ContainerdNode, host: Host, workdir: Path, auths: dict[str, dict[str, str]], *extra: str
) -> subprocess.CompletedProcess[str]:
    secret = workdir / "secret.json"
    secret.write_text(json.dumps({"auths": auths}))
    command = [
        sys.executable, "-m", "node_agent", "reconcile",
        "--secret-file", str(secret),
        "--containerd-config", str(node.config_path),
        "--targets", "containerd",
        "--state-dir", str(workdir / "state"),
        "--containerd-socket", str(node.socket_path),
        "--reload", "trigger",
        "--restart-trigger-dir", str(host.directory),
        "--reload-timeout", "20s",
        *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_containerd_restarted_by_the_host_pulls_with_the_new_credentials(
    containerd_node: ContainerdNode,
    host: Host,
    auth_registry: AuthRegistry,
    pushed_image: PushedImage,
    tmp_path: Path,
) -> None:
    assert pull(containerd_node, pushed_image) == "401"
    pid = containerd_node.pid()
    result = reconcile(containerd_node, host, tmp_path, credentials_for(auth_registry))
    assert result.returncode == 0, result.stderr
    assert "containerd: restarted, CRI answering" in result.stdout
    assert containerd_node.pid() != pid
    assert host.systemctl_log.read_text() == "restart containerd.service\n"
    assert pull(containerd_node, pushed_image) == "ok"


def test_a_restart_by_the_host_that_leaves_containerd_dead_is_rolled_back(
    containerd_node: ContainerdNode,
    host: Host,
    auth_registry: AuthRegistry,
    pushed_image: PushedImage,
    tmp_path: Path,
) -> None:
    original = containerd_node.config_path.read_text()
    containerd_node.break_next_restart()
    result = reconcile(
        containerd_node, host, tmp_path, credentials_for(auth_registry), "--reload-timeout", "3s"
    )
    assert result.returncode == 1
    assert "previous config.toml restored and containerd restarted healthy" in result.stderr
    assert containerd_node.config_path.read_text() == original
    assert containerd_node.cri_ready()
    assert pull(containerd_node, pushed_image) == "401"
