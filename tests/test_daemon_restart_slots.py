"""Daemons on several nodes sharing restart slots, in-process with the real client
against the test API server: config.json changes at once everywhere, containerd restarts
take turns, a node that waits says so, and a restart that fails stops the rollout.

The server's slot audit (tests/kubeapi.py) fails any test in which a slot was taken while
still renewed or updated without a resourceVersion.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_cri import FakeCri
from kubeapi import KubeApiServer
from support.agent import Agent, start_in_process
from support.node import MINIMAL_FOREIGN_JSON, MINIMAL_FOREIGN_TOML, REGISTRY, NodeTree
from support.settings import (
    NAME,
    NS,
    RESTART_SCRIPT,
    agent_settings,
    create_secret,
    fast_timings,
    restart_script_command,
    update_secret,
)
from support.waiting import wait_until

from node_agent.settings import RestartCoordination

SLOT = "node-agent-restart-0"
ONE_SLOT = RestartCoordination(concurrency=1, lease_ttl=10.0, settle=0.2, lease_namespace=NS)

StartNode = Callable[..., Agent]


@pytest.fixture
def start_node(kube_api: KubeApiServer, tmp_path: Path) -> Iterator[StartNode]:
    """Starts a daemon for a new node tree named `name`, with its own fake CRI."""
    script = tmp_path / "restart.sh"
    script.write_text(RESTART_SCRIPT)
    agents: list[Agent] = []
    fakes: list[tuple[FakeCri, str]] = []

    def start(
        name: str,
        *,
        restart_seconds: float = 0.3,
        restarts: RestartCoordination = ONE_SLOT,
    ) -> Agent:
        directory = tempfile.mkdtemp(prefix="na-cri-", dir="/tmp")
        socket_path = os.path.join(directory, "cri.sock")
        fakes.append((FakeCri(socket_path).start(), directory))
        node = NodeTree.create(
            tmp_path / name, toml=MINIMAL_FOREIGN_TOML, json_text=MINIMAL_FOREIGN_JSON
        )
        settings = agent_settings(
            node,
            kube_api,
            cri_socket=socket_path,
            restart_command=restart_script_command(node, script, restart_seconds),
            node_name=name,
            restarts=restarts,
        )
        agent = start_in_process(settings, node, kube_api, fast_timings())
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
    for fake, directory in fakes:
        fake.stop()
        shutil.rmtree(directory, ignore_errors=True)


def restart_intervals(node: NodeTree) -> list[tuple[float, float]]:
    """(start, end) of each successful restart (wall clock)."""
    return list(zip(node.restart_attempts(), node.restart_times(), strict=True))


def assert_never_overlap(*nodes: NodeTree) -> None:
    intervals = sorted(interval for node in nodes for interval in restart_intervals(node))
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, f"restarts overlap: {intervals}"


def holder(kube_api: KubeApiServer) -> str | None:
    lease = kube_api.lease(NS, SLOT)
    return None if lease is None else lease["spec"].get("holderIdentity")


def queued_events(kube_api: KubeApiServer, node: str) -> list[dict[str, object]]:
    return [
        event
        for event in kube_api.events("default", reason="ContainerdRestartQueued")
        if event["involvedObject"]["name"] == node
    ]


def test_two_nodes_with_one_slot_take_turns_and_both_end_updated(
    kube_api: KubeApiServer, start_node: StartNode
) -> None:
    create_secret(kube_api, "pw-1")
    a, b = start_node("node-a"), start_node("node-b")
    a.wait_for_passwords("pw-1", timeout=10)
    b.wait_for_passwords("pw-1", timeout=10)
    update_secret(kube_api, "pw-2")
    a.wait_for_passwords("pw-2", timeout=10)
    b.wait_for_passwords("pw-2", timeout=10)
    wait_until(lambda: a.node.restarts() == 2 and b.node.restarts() == 2, timeout=10)
    assert_never_overlap(a.node, b.node)
    wait_until(lambda: holder(kube_api) is None, timeout=5, what="the slot is given back")
    for agent in (a, b):
        assert agent.metric("node_agent_restart_pending") == 0
        assert agent.metric("node_agent_in_sync", target="containerd") == 1


def slow_rollout(kube_api: KubeApiServer, start_node: StartNode) -> tuple[Agent, Agent]:
    """Two nodes whose restarts take 1.5 s, started on pw-1 and given pw-2: the node that
    holds the slot, and the one that waits for it (its config.json already says pw-2)."""
    create_secret(kube_api, "pw-1")
    a, b = start_node("node-a", restart_seconds=1.5), start_node("node-b", restart_seconds=1.5)
    wait_until(lambda: a.node.restarts() == 1 and b.node.restarts() == 1, timeout=15)
    wait_until(lambda: holder(kube_api) is None, timeout=5)
    update_secret(kube_api, "pw-2")
    wait_until(lambda: holder(kube_api) is not None, timeout=5)
    first, waiting = (a, b) if holder(kube_api) == "node-a" else (b, a)
    wait_until(lambda: waiting.node.kubelet_password() == "pw-2", timeout=2)
    return first, waiting


def test_the_waiting_node_applies_config_json_at_once_and_says_it_waits(
    kube_api: KubeApiServer, start_node: StartNode
) -> None:
    first, waiting = slow_rollout(kube_api, start_node)
    assert waiting.node.containerd_password() == "pw-1"  # its containerd waits its turn
    wait_until(lambda: waiting.metric("node_agent_restart_pending") == 1, timeout=2)
    # The wait is reported while the pass still runs; its in-sync figures when it ends.
    wait_until(lambda: waiting.metric("node_agent_in_sync", target="containerd") == 0, 2)
    assert waiting.metric("node_agent_in_sync", target="kubelet") == 1
    wait_until(lambda: queued_events(kube_api, waiting.node.root.name), timeout=2)
    first.wait_for_passwords("pw-2", timeout=5)
    waiting.wait_for_passwords("pw-2", timeout=10)
    wait_until(lambda: waiting.node.restarts() == 2, timeout=5)
    assert waiting.metric("node_agent_restart_pending") == 0
    assert len(queued_events(kube_api, waiting.node.root.name)) == 1
    assert_never_overlap(first.node, waiting.node)


def test_changes_during_the_wait_become_one_restart_with_the_newest(
    kube_api: KubeApiServer, start_node: StartNode
) -> None:
    first, waiting = slow_rollout(kube_api, start_node)
    update_secret(kube_api, "pw-3")
    waiting.wait_for_passwords("pw-3", timeout=10)
    wait_until(lambda: waiting.node.restarts() == 2, timeout=5)
    time.sleep(2.0)  # longer than a second restart would take to start and end
    # start-up, then one restart for pw-2 and pw-3 together
    assert len(waiting.node.restart_attempts()) == 2
    assert_never_overlap(first.node, waiting.node)


def test_a_restart_that_fails_keeps_the_slot_and_stops_the_rollout(
    kube_api: KubeApiServer, start_node: StartNode
) -> None:
    create_secret(kube_api, "pw-1")
    a, b = start_node("node-a"), start_node("node-b")
    wait_until(lambda: a.node.restarts() == 1 and b.node.restarts() == 1, timeout=10)
    wait_until(lambda: holder(kube_api) is None, timeout=5)
    # A change containerd does not come back with (the restart script fails on it).
    entry = {"username": "puller", "password": "pw-1"}
    bad = {"auths": {REGISTRY: entry, "broken.example": entry}}
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": json.dumps(bad).encode()})
    wait_until(lambda: kube_api.events("default", reason="ContainerdRestartSlotKept"), timeout=10)
    kept_by = holder(kube_api)
    failing, waiting = (a, b) if kept_by == "node-a" else (b, a)
    wait_until(lambda: "broken.example" in waiting.node.config_json.read_text(), timeout=2)
    wait_until(lambda: waiting.metric("node_agent_restart_pending") == 1, timeout=2)
    time.sleep(2.5)  # past a TTL/3 renewal and a --min-reload-interval retry of the bad change
    assert holder(kube_api) == kept_by
    assert "broken.example" not in waiting.node.config_toml.read_text()  # it never spread
    assert waiting.node.restarts() == 1
    assert "broken.example" not in failing.node.config_toml.read_text()  # rolled back
    # The fix: the next change restarts healthy, releases the slot, the rollout goes on.
    update_secret(kube_api, "pw-2")
    a.wait_for_passwords("pw-2", timeout=10)
    b.wait_for_passwords("pw-2", timeout=10)
    wait_until(lambda: holder(kube_api) is None, timeout=5)
    assert waiting.metric("node_agent_restart_pending") == 0


def test_a_holder_killed_mid_restart_loses_its_slot_after_the_ttl_and_only_then(
    kube_api: KubeApiServer, start_node: StartNode, tmp_path: Path
) -> None:
    assert kube_api.kubeconfig_path is not None
    create_secret(kube_api, "pw-1")
    node = NodeTree.create(
        tmp_path / "node-dead", toml=MINIMAL_FOREIGN_TOML, json_text=MINIMAL_FOREIGN_JSON
    )
    started = tmp_path / "restart-started"
    script = tmp_path / "hang.sh"
    script.write_text(f"#!/bin/sh\ntouch {started}\nsleep 60\n")
    ttl = 8.0
    dying = subprocess.Popen(
        [
            sys.executable, "-m", "node_agent", "run",
            "--secret", f"{NS}/{NAME}",
            "--kubeconfig", str(kube_api.kubeconfig_path),
            "--node-name", "node-dead",
            "--containerd-config", str(node.config_toml),
            "--kubelet-config", str(node.config_json),
            "--state-dir", str(node.state_dir),
            "--reload", "command",
            "--reload-command", f"/bin/sh {script}",
            "--reload-timeout", "3s",
            "--restart-lease-ttl", f"{ttl:g}s",
            "--restart-lease-namespace", NS,
            "--metrics-address", "127.0.0.1:0",
        ],
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(started.exists, timeout=15, what="the dying agent restarts containerd")
        assert holder(kube_api) == "node-dead"
        os.killpg(dying.pid, signal.SIGKILL)  # the agent and its restart, mid-restart
        dying.wait(5)
        killed_at = time.monotonic()
        other = start_node("node-b", restarts=RestartCoordination(
            concurrency=1, lease_ttl=ttl, settle=0.0, lease_namespace=NS))  # fmt: skip
        other.wait_for_passwords("pw-1", timeout=ttl + 10)
        assert time.monotonic() - killed_at >= ttl - 3.0  # less the slot's last renewal age
    finally:
        with_suppressed_kill(dying)
    changes = kube_api.slot_timeline(NS)
    takeover = [c for c in changes if c.kind == "takeover"]
    assert [(c.old_holder, c.new_holder) for c in takeover] == [("node-dead", "node-b")]
    last_by_dead = max(c.at for c in changes if c.new_holder == "node-dead")
    assert takeover[0].at - last_by_dead >= ttl


def with_suppressed_kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
