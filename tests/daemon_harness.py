"""The names tests/test_daemon_restart_slots.py imports, now in tests/support; new tests
import tests/support directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubeapi import KubeApiServer
from support import agent
from support.node import MINIMAL_FOREIGN_JSON, MINIMAL_FOREIGN_TOML, REGISTRY, NodeTree
from support.settings import (
    NAME,
    NODE_NAME,
    NS,
    RESTART_SCRIPT,
    create_secret,
    fast_timings,
    restart_script_command,
    update_secret,
)
from support.settings import (
    agent_settings as _agent_settings,
)

from node_agent.daemon.daemon import Daemon
from node_agent.daemon.run import build_daemon
from node_agent.settings import DaemonSettings, RestartCoordination

__all__ = [
    "NAME",
    "NS",
    "REGISTRY",
    "RESTART_SCRIPT",
    "Agent",
    "Node",
    "agent_settings",
    "create_secret",
    "start_daemon",
    "update_secret",
]


@dataclass(frozen=True)
class Node(NodeTree):
    @classmethod
    def create(
        cls,
        root: Path,
        *,
        toml: str | None = MINIMAL_FOREIGN_TOML,
        json_text: str | None = MINIMAL_FOREIGN_JSON,
    ) -> Node:
        return super().create(root, toml=toml, json_text=json_text)


@dataclass
class Agent(agent.Agent):
    node: Node


def agent_settings(
    node: NodeTree,
    kube_api: KubeApiServer,
    *,
    cri_socket: str,
    restart_script: Path,
    node_name: str = NODE_NAME,
    restart_seconds: float = 0.0,
    restarts: RestartCoordination | None = None,
) -> DaemonSettings:
    return _agent_settings(
        node,
        kube_api,
        cri_socket=cri_socket,
        restart_command=restart_script_command(node, restart_script, restart_seconds),
        node_name=node_name,
        restarts=restarts,
    )


def start_daemon(settings: DaemonSettings) -> Daemon:
    timings = fast_timings()
    daemon = build_daemon(
        settings, watch_settings=timings.watch, timing=timings.worker, slot_timing=timings.slots
    )
    daemon.start()
    return daemon
