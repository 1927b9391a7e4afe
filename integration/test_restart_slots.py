"""Fleet-safe restarts on real containerds: two `node-agent run` processes, one per node tree
(node-a, node-b), each with its own real containerd, follow one Secret through one test API
server with `--restart-concurrency 1`.

A Secret created before the agents start, then rotated, must reach both containerds (a pull
without credentials in the request succeeds on each), while containerd restarts never overlap:
each restart runs inside the interval its node held the one slot Lease, and the restarts'
own intervals are disjoint. kubelet's config.json is not paced: the node that waits for the
slot has its config.json updated before the node ahead of it gives the slot back.

Every restart goes through a wrapper around the node's real restart command that appends
`start|end NODE WALL_TIME` to a shared log. The server's slot timeline is kept on the same
wall clock (`clock=time.time`), so the two can be compared. The server's restart-slot audit
(at most one holder, no takeover of a renewed slot, updates only with a resourceVersion)
fails the test at teardown.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.containerd import CRI_PLUGIN, ContainerdNode
from integration.oci_image import PushedImage
from integration.registry import AuthRegistry
from integration.test_daemon import DOCKERCONFIG, NAME, NS, dockerconfig, pull, wait_for_pull

# The test API server lives with the unit tests; `tests/` is not a package.
_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))
from kubeapi import KubeApiServer, SlotChange  # noqa: E402

pytestmark = pytest.mark.integration

LEASE_NS = "node-agent"
SLOT = "node-agent-restart-0"
NODES = ("node-a", "node-b")
ROTATED = "rotated-Pa55"

# Writes one line before and one after the node's real restart command (appends of one short
# line are atomic, so both nodes share the log). `date +%s.%N`: wall clock, nanoseconds.
WRAPPER = """#!/bin/sh
echo "start {node} $(date +%s.%N)" >>{log}
{restart}
rc=$?
echo "end {node} $(date +%s.%N) $rc" >>{log}
exit $rc
"""


@dataclass(frozen=True)
class Restart:
    node: str
    start: float
    end: float
    code: int


@dataclass(frozen=True)
class Holding:
    node: str
    start: float
    end: float
    """`math.inf` while still held."""


@dataclass
class NodeTree:
    """One node: its containerd and the agent's files."""

    name: str
    containerd: ContainerdNode
    root: Path

    @property
    def config_json(self) -> Path:
        return self.root / "kubelet/config.json"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    def containerd_password(self, host: str) -> str | None:
        configs = tomllib.loads(self.containerd.config_path.read_text())["plugins"][CRI_PLUGIN]
        auth = configs["registry"]["configs"].get(host, {}).get("auth")
        return None if auth is None else str(auth["password"])

    def kubelet_password(self, host: str) -> str | None:
        entry = json.loads(self.config_json.read_text())["auths"].get(host)
        return None if entry is None else base64.b64decode(entry["auth"]).decode().partition(":")[2]


def read_restarts(log: Path) -> list[Restart]:
    """Every finished restart in the wrapper's log, by start time."""
    started: dict[str, float] = {}
    restarts: list[Restart] = []
    for line in log.read_text().splitlines() if log.exists() else []:
        event, node, at, *code = line.split()
        if event == "start":
            assert node not in started, f"{node} started a restart inside its own restart"
            started[node] = float(at)
        else:
            restarts.append(Restart(node, started.pop(node), float(at), int(code[0])))
    assert not started, f"restarts still running: {started}"
    return sorted(restarts, key=lambda restart: restart.start)


def holdings(timeline: list[SlotChange]) -> list[Holding]:
    """Who held the slot when, from the server's slot timeline."""
    held: list[Holding] = []
    current: tuple[str, float] | None = None
    for change in timeline:
        if current is not None and change.new_holder != current[0]:
            held.append(Holding(current[0], current[1], change.at))
            current = None
        if current is None and change.new_holder:
            current = (change.new_holder, change.at)
    if current is not None:
        held.append(Holding(current[0], current[1], math.inf))
    return held


def slot_holder(kube_api: KubeApiServer) -> str | None:
    lease = kube_api.lease(LEASE_NS, SLOT)
    return None if lease is None else lease["spec"].get("holderIdentity")


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[KubeApiServer]:
    """The test API server with its slot timeline on the wall clock (the wrapper's clock) and
    an audit of at most one slot holder; fails the test on any audit violation."""
    with KubeApiServer(
        kubeconfig_path=tmp_path / "kubeconfig",
        bookmark_interval=0.5,
        clock=time.time,
        max_holders=1,
    ) as server:
        yield server
    assert server.unexpected_errors == []
    assert server.violations() == [], "restart-slot audit: Leases were used unsafely"


@pytest.fixture
def restart_log(tmp_path: Path) -> Path:
    return tmp_path / "restarts.log"


@pytest.fixture
def start_agents(
    kube_api: KubeApiServer,
    make_containerd_node: Callable[[str], ContainerdNode],
    restart_log: Path,
    tmp_path: Path,
) -> Iterator[Callable[[], list[NodeTree]]]:
    """Start containerd and `node-agent run` (N = 1, settle 1 s) on node-a and node-b."""
    running: list[tuple[subprocess.Popen[str], NodeTree]] = []

    def start() -> list[NodeTree]:
        trees = []
        for name in NODES:
            tree = NodeTree(name, make_containerd_node(name), tmp_path / name)
            (tree.root / "kubelet").mkdir(parents=True)
            wrapper = tree.root / "restart.sh"
            wrapper.write_text(
                WRAPPER.format(
                    node=name,
                    log=shlex.quote(str(restart_log)),
                    restart=tree.containerd.restart_command,
                )
            )
            wrapper.chmod(0o755)
            running.append((_agent_process(kube_api, tree, wrapper), tree))
            trees.append(tree)
        return trees

    yield start
    for process, _ in running:
        process.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    for process, tree in running:
        try:
            codes[tree.name] = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            codes[tree.name] = None
    for _, tree in running:
        assert codes[tree.name] == 0, f"{tree.name}: {tree.agent_log.read_text()}"


def _agent_process(kube_api: KubeApiServer, tree: NodeTree, wrapper: Path) -> subprocess.Popen[str]:
    assert kube_api.kubeconfig_path is not None
    command = [
        *(sys.executable, "-m", "node_agent", "run"),
        *("--secret", f"{NS}/{NAME}"),
        *("--kubeconfig", str(kube_api.kubeconfig_path)),
        *("--node-name", tree.name),
        *("--containerd-config", str(tree.containerd.config_path)),
        *("--kubelet-config", str(tree.config_json)),
        *("--state-dir", str(tree.root / "state")),
        *("--containerd-socket", str(tree.containerd.socket_path)),
        *("--reload", "command", "--reload-command", str(wrapper)),
        *("--reload-timeout", "10s", "--min-reload-interval", "1s"),
        *("--restart-concurrency", "1", "--restart-lease-namespace", LEASE_NS),
        *("--restart-lease-ttl", "15s", "--restart-settle", "1s"),
        *("--metrics-address", "127.0.0.1:0"),
    ]
    with tree.agent_log.open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)


def assert_one_at_a_time(restarts: list[Restart], held: list[Holding]) -> None:
    """Disjoint restart intervals, each inside a time its node held the slot."""
    for earlier, later in itertools.pairwise(restarts):
        assert earlier.end < later.start, f"restarts overlap: {earlier} and {later}"
    for restart in restarts:
        assert restart.code == 0, f"restart failed: {restart}"
        assert any(
            h.node == restart.node and h.start < restart.start and restart.end < h.end for h in held
        ), f"{restart} outside every time {restart.node} held {SLOT}: {held}"


def test_two_nodes_with_one_slot_restart_containerd_in_turn_and_both_pull_with_the_new_secret(
    start_agents: Callable[[], list[NodeTree]],
    kube_api: KubeApiServer,
    auth_registry: AuthRegistry,
    pushed_image: PushedImage,
    restart_log: Path,
) -> None:
    host, first_password = auth_registry.host, auth_registry.password
    kube_api.create_secret(NS, NAME, dockerconfig(auth_registry, first_password), type=DOCKERCONFIG)
    trees = start_agents()
    for tree in trees:
        wait_for_pull(tree.containerd, pushed_image)

    auth_registry.rotate_password(ROTATED)
    for tree in trees:
        assert "401 Unauthorized" in pull(tree.containerd, pushed_image)
    rotated_at = time.time()
    kube_api.update_secret(NS, NAME, dockerconfig(auth_registry, ROTATED))
    for tree in trees:
        wait_for_pull(tree.containerd, pushed_image)
    wait_for(lambda: slot_holder(kube_api) is None, timeout=10, what="the slot given back")

    for tree in trees:
        assert tree.containerd_password(host) == ROTATED
        assert tree.kubelet_password(host) == ROTATED
        log = tree.agent_log.read_text()
        assert ROTATED not in log and first_password not in log

    restarts = read_restarts(restart_log)
    held = holdings(kube_api.slot_timeline(LEASE_NS))
    assert_one_at_a_time(restarts, held)
    # At start each node restarted once for the created Secret, then once for the rotation.
    assert sorted(r.node for r in restarts if r.start < rotated_at) == list(NODES)
    rotation = [r for r in restarts if r.start > rotated_at]
    assert sorted(r.node for r in rotation) == list(NODES)

    # The node that waited had kubelet's config.json updated while the other node held the
    # slot, before the other node gave it back, and long before its own containerd restart.
    first, waiting = rotation
    first_turn = next(h for h in held if h.node == first.node and h.start < first.start < h.end)
    waiting_tree = next(tree for tree in trees if tree.name == waiting.node)
    config_json_written = waiting_tree.config_json.stat().st_mtime
    assert config_json_written < first_turn.end <= waiting.start
