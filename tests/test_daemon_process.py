"""`python -m node_agent run` as a separate process: signals, exit codes, `--once`, and the
imports each command pays for."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubeapi import KubeApiServer
from support.dockerconfig import DOCKERCONFIG, registry_login
from support.node import REGISTRY
from support.settings import NAME, NS
from support.waiting import wait_until


@pytest.fixture
def node(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "var/lib/kubelet").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    return root


def agent_command(node: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "node_agent",
        "run",
        "--containerd-config",
        str(node / "etc/containerd/config.toml"),
        "--kubelet-config",
        str(node / "var/lib/kubelet/config.json"),
        "--state-dir",
        str(node / "var/lib/node-agent"),
        "--metrics-address",
        "127.0.0.1:0",
        "--debounce",
        "50ms",
        *extra,
    ]




def kubelet_text(node: Path) -> str:
    path = node / "var/lib/kubelet/config.json"
    return path.read_text() if path.exists() else ""


def test_sigterm_during_a_pass_finishes_it_and_exits_0_within_5s_leaving_no_temp_files(
    kube_api: KubeApiServer, node: Path, cri_socket: str, tmp_path: Path
) -> None:
    assert kube_api.kubeconfig_path is not None
    restarts = tmp_path / "restarts.log"
    script = tmp_path / "restart.sh"
    started_log = tmp_path / "started.log"
    script.write_text(
        f"#!/bin/sh\necho started >> {started_log}\nsleep 1\necho done >> {restarts}\n"
    )
    kube_api.create_secret(NS, NAME, registry_login(REGISTRY, "Pa55-before"), type=DOCKERCONFIG)
    command = agent_command(
        node,
        "--secret",
        f"{NS}/{NAME}",
        "--kubeconfig",
        str(kube_api.kubeconfig_path),
        "--node-name",
        "node-1",
        "--reload",
        "command",
        "--reload-command",
        f"/bin/sh {script}",
        "--containerd-socket",
        cri_socket,
        "--min-reload-interval",
        "0s",
        "--restart-lease-namespace",
        NS,
        "--restart-settle",
        "0s",
    )
    agent = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(restarts.exists, timeout=10.0)  # the first pass is done
        kube_api.update_secret(NS, NAME, registry_login(REGISTRY, "Pa55-rotated"))
        wait_until(lambda: "cHVsbGVyOlBhNTUtcm90YXRlZA==" in kubelet_text(node), timeout=10.0)
        wait_until(lambda: started_log.read_text().split() == ["started", "started"], timeout=10.0)
        started = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr
    assert elapsed < 5.0
    assert restarts.read_text().split() == ["done", "done"]  # the pass in progress finished
    state = json.loads((node / "var/lib/node-agent/owned.json").read_text())
    assert state["containerd_restart_pending"] is False
    assert [p for p in node.rglob("*") if ".node-agent-" in p.name] == []
    assert "stopped" in stderr
    assert "Pa55" not in stderr


def test_sigint_on_an_idle_file_only_agent_exits_0_at_once(node: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_bytes(registry_login(REGISTRY, "pw")[".dockerconfigjson"])
    command = agent_command(node, "--secret-file", str(secret), "--reload", "none")
    agent = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: REGISTRY in kubelet_text(node), timeout=10.0)
        started = time.monotonic()
        agent.send_signal(signal.SIGINT)
        agent.communicate(timeout=10)
    finally:
        agent.kill()
    assert agent.returncode == 0
    assert time.monotonic() - started < 2.0


def test_once_runs_one_pass_and_exits(kube_api: KubeApiServer, node: Path) -> None:
    assert kube_api.kubeconfig_path is not None
    kube_api.create_secret(NS, NAME, registry_login(REGISTRY, "pw"), type=DOCKERCONFIG)
    api_flags = ("--secret", f"{NS}/{NAME}", "--kubeconfig", str(kube_api.kubeconfig_path))
    command = agent_command(node, *api_flags, "--no-events", "--reload", "none", "--once")
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert REGISTRY in kubelet_text(node)
    assert [r.verb for r in kube_api.requests(plural="secrets")] == ["list"]

    kube_api.update_secret(NS, NAME, {".dockerconfigjson": b"{}"})
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert "auths: missing" in result.stderr


IMPORTS_PROBE = """
import sys
from node_agent.cli import main
code = main(sys.argv[1:])
print("IMPORTED", sorted(m for m in ("kubernetes", "watchdog") if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("command", "imported"),
    [
        (["reconcile"], []),
        (["run", "--once"], ["watchdog"]),
    ],
)
def test_commands_without_api_sources_never_import_kubernetes(
    node: Path, tmp_path: Path, command: list[str], imported: list[str]
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_bytes(registry_login(REGISTRY, "pw")[".dockerconfigjson"])
    flags = ["--secret-file", str(secret), "--host-root", str(node), "--reload", "none"]
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, *command, *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert f"IMPORTED {imported}" in result.stdout, result.stderr
