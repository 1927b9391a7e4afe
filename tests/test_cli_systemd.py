"""`node-agent reconcile` with the default `--reload systemd`, end to end through the node's
paths under `--host-root`: D-Bus RestartUnit on a fake systemd (a real private dbus-daemon),
then CRI Version on a fake CRI server (a real gRPC server) at the node's containerd socket."""

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_cri import FakeCri
from fake_systemd import FakeSystemd, private_bus
from support.dockerconfig import docker_config, login

from node_agent.cli import main

RESTART = ("RestartUnit", "containerd.service", "replace")


@dataclass
class Node:
    root: Path
    systemd: FakeSystemd
    cri: FakeCri

    def reconcile(self, password: str) -> int:
        secret = self.root.parent / "secret.json"
        secret.write_bytes(docker_config({"reg.example": login(password, username="u")}))
        return main(
            ["reconcile", "--secret-file", str(secret), "--host-root", str(self.root)], environ={}
        )

    def cri_version_calls(self) -> int:
        return sum(1 for method, _ in self.cri.requests if method.endswith("/Version"))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node tree whose system bus and containerd socket are served by fakes."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed (Debian package 'dbus')")
    root = tmp_path / "h"
    for directory in ("etc/containerd", "var/lib/kubelet", "run/dbus", "run/containerd"):
        (root / directory).mkdir(parents=True)
    bus_dir = tmp_path / "bus"
    bus_dir.mkdir()
    with private_bus(bus_dir) as address:
        (root / "run/dbus/system_bus_socket").symlink_to(bus_dir / "bus")
        systemd = FakeSystemd(address)
        systemd.start()
        cri = FakeCri(str(root / "run/containerd/containerd.sock")).start()
        try:
            yield Node(root, systemd, cri)
        finally:
            cri.stop()
            systemd.stop()


def test_default_reload_restarts_through_systemd_then_asks_cri(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert node.reconcile("p1") == 0
    assert node.systemd.restart_unit_calls() == [RESTART]
    assert node.cri_version_calls() >= 1
    assert "containerd: restarted, CRI answering" in capsys.readouterr().out


def test_no_restart_when_in_sync_or_when_only_kubelet_changed(node: Node) -> None:
    node.reconcile("p1")
    node.reconcile("p1")
    (node.root / "var/lib/kubelet/config.json").unlink()
    assert node.reconcile("p1") == 0
    assert node.systemd.restart_unit_calls() == [RESTART]


def test_each_containerd_auth_change_restarts_once(node: Node) -> None:
    node.reconcile("p1")
    node.reconcile("p2")
    assert node.systemd.restart_unit_calls() == [RESTART, RESTART]


def test_a_failed_systemd_job_rolls_config_toml_back(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.systemd.job_result = "failed"
    assert node.reconcile("p1") == 1
    error = capsys.readouterr().err
    assert "config rolled back, but containerd still failed" in error
    assert error.count("node-agent: error:") == 1
    assert not (node.root / "etc/containerd/config.toml").exists()  # it did not exist before
    assert node.systemd.restart_unit_calls() == [RESTART, RESTART]
