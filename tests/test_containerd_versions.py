"""Which containerd the node runs decides what happens to config.toml auth: one table
(node_agent/containerd_versions.py), a test per row, and the commands and the daemon
taking the documented path with a fake CRI answering each version."""

import json
from pathlib import Path

import pytest
from kubeapi import KubeApiServer
from support.cri import containerd_version, fake_cri_socket

from node_agent.cli import main
from node_agent.containerd_versions import (
    SUPPORT,
    ConfigTomlAuth,
    Row,
    support_for,
)

WRITE, WARN, LEAVE = (
    ConfigTomlAuth.WRITE,
    ConfigTomlAuth.WRITE_WITH_WARNING,
    ConfigTomlAuth.LEAVE_ALONE,
)
ENTRY = {"username": "u", "password": "Pa55-versions"}


@pytest.mark.parametrize(
    ("runtime_version", "auth"),
    [
        ("1.6.20~ds1", WRITE),  # Debian's containerd 1.6
        ("1.7.24", WRITE),
        ("v2.0.5", WRITE),
        ("v2.1.0", WARN),  # registry.configs turns the Transfer Service off
        ("2.3.2-rc.1", WARN),
        ("v2.4.0", LEAVE),  # registry.configs removed
        ("3.0.0", LEAVE),
        (None, WRITE),  # could not be asked: as before
        ("", WRITE),
        ("not-a-version", WRITE),
    ],
)
def test_each_containerd_version_has_one_row(
    runtime_version: str | None, auth: ConfigTomlAuth
) -> None:
    assert support_for(runtime_version).auth is auth


def test_a_future_containerd_is_one_more_row() -> None:
    table = (*SUPPORT, Row((2, 5), WRITE, "a containerd that reads registry.configs again"))
    assert support_for("v2.5.1", table).auth is WRITE
    assert support_for("v2.4.9", table).auth is LEAVE


def test_each_non_plain_row_says_why_and_what_to_use_instead() -> None:
    for row in SUPPORT[1:]:
        assert "credential-provider" in row.why and "kubelet" in row.why


def node_around(socket_path: str) -> Path:
    """A node tree whose host root holds the fake CRI's socket as `/cri.sock` (a socket path
    must stay short, so the root is the fake's own short directory)."""
    root = Path(socket_path).parent
    (root / "etc/containerd").mkdir(parents=True)
    (root / "var/lib/kubelet").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    return root


def reconcile(host: Path, tmp_path: Path, socket_path: str) -> int:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"auths": {"reg.example": ENTRY}}))
    flags = [
        "--secret-file", str(secret), "--host-root", str(host), "--reload", "none",
        "--containerd-socket", socket_path,
    ]  # fmt: skip
    return main(["reconcile", *flags], environ={})


@pytest.mark.parametrize(
    ("runtime_version", "written", "warning"),
    [
        ("1.6.20~ds1", True, None),
        ("v2.2.1", True, "config.toml auth: write, with a warning (containerd 2.1+ reads"),
        ("v2.4.0", False, "config.toml auth: leave alone (containerd 2.4+ no longer reads"),
    ],
    ids=["write", "write + warning", "leave alone"],
)
def test_reconcile_takes_the_path_of_the_containerd_it_finds(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    runtime_version: str,
    written: bool,
    warning: str | None,
) -> None:
    with fake_cri_socket(version=containerd_version(runtime_version)) as socket_path:
        host = node_around(socket_path)
        assert reconcile(host, tmp_path, "/cri.sock") == 0
        config_toml = (host / "etc/containerd/config.toml").read_text()
        assert ("reg.example" in config_toml) is written
        assert "reg.example" in (host / "var/lib/kubelet/config.json").read_text()
    err = capsys.readouterr().err
    if warning is None:
        assert "config.toml auth" not in err
    else:
        assert f"containerd {runtime_version}: {warning}" in err


def test_no_containerd_answering_keeps_config_toml_as_before(tmp_path: Path) -> None:
    with fake_cri_socket() as socket_path:
        host = node_around(socket_path)
        assert reconcile(host, tmp_path, "/run/containerd/none.sock") == 0
        assert "reg.example" in (host / "etc/containerd/config.toml").read_text()


def test_the_daemon_says_so_once_with_a_warning_event(
    tmp_path: Path, kube_api: KubeApiServer
) -> None:
    assert kube_api.kubeconfig_path is not None
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"auths": {"reg.example": ENTRY}}))
    with fake_cri_socket(version=containerd_version("v2.4.1")) as socket_path:
        host = node_around(socket_path)
        argv = [
            "run", "--once", "--secret-file", str(secret), "--host-root", str(host),
            "--reload", "none", "--kubeconfig", str(kube_api.kubeconfig_path),
            "--node-name", "node-1", "--events", "--containerd-socket", "/cri.sock",
        ]  # fmt: skip
        assert main(argv, environ={}) == 0
        assert (host / "etc/containerd/config.toml").read_text() == "version = 2\n"
    (event,) = kube_api.events("default", reason="ContainerdConfigTomlLeftAlone")
    assert event["type"] == "Warning"
    assert "containerd v2.4.1: config.toml auth: leave alone" in event["message"]
