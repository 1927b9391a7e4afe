"""How the tests run the daemon: the Secret it follows, its settings for a node tree
(`agent_settings`, or `daemon_argv` for the agent as a process), and its inner timings,
either short fixed ones (`fast_timings`) or production's compressed (`TimeScale`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kubeapi import KubeApiServer

from node_agent.daemon.worker import WorkerTiming
from node_agent.kube.model import ObjectRef
from node_agent.kube.secret_watch import WatchSettings
from node_agent.restart_slots.coordinator import SlotTiming
from node_agent.settings import DaemonSettings, RestartCoordination, Settings
from support.dockerconfig import DOCKERCONFIG, registry_login
from support.node import REGISTRY, NodeTree

NS = "kube-system"
NAME = "registry-credentials"
SECRET = ObjectRef(NS, NAME)
"""The Secret the daemon follows."""
NODE_NAME = "node-1"


@dataclass(frozen=True)
class Timings:
    """The daemon's inner timings, which no flag sets."""

    watch: WatchSettings
    worker: WorkerTiming
    slots: SlotTiming | None = None
    """None: production's."""


FAST_WATCH = WatchSettings(
    watch_timeout_seconds=10,
    connect_timeout=1.0,
    list_read_timeout=2.0,
    watch_read_timeout=0.5,  # the test server sends a bookmark every 0.1 s
    backoff_initial=0.05,
    backoff_max=0.2,
)
FAST_SLOTS = SlotTiming(start_jitter=0.0, retry_initial=0.05, retry_max=0.2, renew_retry=0.1)


def fast_timings(resync_interval: float = 60.0) -> Timings:
    """Retries within a fraction of a second, so a test sees their effect at once."""
    worker = WorkerTiming(
        resync_interval=resync_interval, heartbeat=1.0, retry_initial=0.05, retry_max=0.2
    )
    return Timings(FAST_WATCH, worker, FAST_SLOTS)


@dataclass(frozen=True)
class TimeScale:
    """The daemon's production timings (README flags, `WatchSettings`, `WorkerTiming`) divided
    by `factor`: N simulated seconds run in N/factor real seconds with the same number of
    watch retries, resyncs, pass retries and restart intervals. Timeouts that only guard
    against a slow peer (connect, list read, a stalled watch) are not compressed below a
    second: on a loaded 2-core machine a compressed one would fail for the wrong reason."""

    factor: float

    def __call__(self, seconds: float) -> float:
        return seconds / self.factor

    def watch(self) -> WatchSettings:
        return WatchSettings(
            watch_timeout_seconds=max(1, round(self(300))),
            connect_timeout=1.0,
            list_read_timeout=2.0,
            watch_read_timeout=max(1.0, self(330)),  # the test server bookmarks every 0.1 s
            backoff_initial=self(1),
            backoff_max=self(60),
        )

    def worker(self) -> WorkerTiming:
        return WorkerTiming(
            resync_interval=self(300),
            heartbeat=min(1.0, self(10)),
            retry_initial=self(1),
            retry_max=self(60),
        )

    def timings(self) -> Timings:
        return Timings(self.watch(), self.worker())


# Restarts "containerd": appends its start time to LOG.start and, after SECONDS (default 0),
# its end time to LOG; fails while config.toml names broken.example (like a containerd that
# does not come back with a bad config). Arguments: LOG CONFIG_TOML [SECONDS].
RESTART_SCRIPT = """#!/bin/sh
date +%s.%N >> "$1.start"
sleep "${3:-0}"
if grep -q broken.example "$2"; then
  echo "containerd did not start" >&2
  exit 1
fi
date +%s.%N >> "$1"
"""


def restart_script_command(node: NodeTree, script: Path, seconds: float = 0.0) -> tuple[str, ...]:
    """The restart command running `script` (`RESTART_SCRIPT`) for `node`'s restart log."""
    duration = (f"{seconds:g}",) if seconds else ()
    return ("/bin/sh", str(script), str(node.restart_log), str(node.config_toml), *duration)


def agent_settings(
    node: NodeTree,
    kube_api: KubeApiServer,
    *,
    cri_socket: str | Path | None = None,
    restart_command: Sequence[str] = (),
    restart_timeout: float = 3.0,
    node_name: str = NODE_NAME,
    secrets: tuple[ObjectRef, ...] = (SECRET,),
    secret_files: tuple[Path, ...] = (),
    on_secret_delete: str = "remove",
    resync_interval: float = 60.0,
    debounce: float = 0.05,
    min_restart_interval: float = 1.0,
    restarts: RestartCoordination | None = None,
    log_level: str = "info",
) -> DaemonSettings:
    """`node-agent run` for `node`: Events on when it follows a Secret, metrics on a free
    port, containerd restarted by `restart_command` (none: no restarts), one restart slot in
    NS unless `restarts` says otherwise."""
    assert kube_api.kubeconfig_path is not None
    return DaemonSettings(
        node=Settings(
            secret_files=secret_files,
            containerd_config=node.config_toml,
            kubelet_config=node.config_json,
            state_dir=node.state_dir,
            restart_mode="command" if restart_command else "none",
            restart_command=tuple(restart_command),
            restart_timeout=restart_timeout,
            containerd_socket=Path(cri_socket or node.root / "no-containerd.sock"),
            log_level=log_level,
        ),
        secrets=secrets,
        kubeconfig=kube_api.kubeconfig_path,
        on_secret_delete=on_secret_delete,
        resync_interval=resync_interval,
        debounce=debounce,
        min_restart_interval=min_restart_interval,
        node_name=node_name,
        metrics_address="127.0.0.1:0",
        events=bool(secrets),
        restarts=restarts or RestartCoordination(lease_namespace=NS, lease_ttl=10.0, settle=0.0),
    )


def scaled_settings(
    node: NodeTree,
    kube_api: KubeApiServer,
    *,
    scale: TimeScale,
    restart_command: Sequence[str] = (),
    cri_socket: Path | None = None,
    restart_timeout: float = 3.0,
    min_restart_interval: float | None = None,
) -> DaemonSettings:
    """`agent_settings` with production's intervals compressed by `scale`, debug logs and no
    restart slots."""
    return agent_settings(
        node,
        kube_api,
        cri_socket=cri_socket,
        restart_command=restart_command,
        restart_timeout=restart_timeout,
        resync_interval=scale(300),
        debounce=scale(0.2),
        min_restart_interval=scale(30) if min_restart_interval is None else min_restart_interval,
        restarts=RestartCoordination(concurrency=0),
        log_level="debug",
    )


def daemon_argv(
    node: NodeTree,
    kube_api: KubeApiServer,
    *,
    restart_command: str | None = None,
    cri_socket: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`node-agent run` flags for `node` following the Secret, debug logs, no restart
    slots."""
    assert kube_api.kubeconfig_path is not None
    reload = ["--reload", "none"]
    if restart_command is not None:
        reload = ["--reload", "command", "--reload-command", restart_command]
    return [
        "--secret",
        f"{NS}/{NAME}",
        "--kubeconfig",
        str(kube_api.kubeconfig_path),
        "--node-name",
        NODE_NAME,
        "--containerd-config",
        str(node.config_toml),
        "--kubelet-config",
        str(node.config_json),
        "--state-dir",
        str(node.state_dir),
        "--containerd-socket",
        str(cri_socket or node.root / "no-containerd.sock"),
        "--restart-concurrency",
        "0",
        "--log-level",
        "debug",
        *reload,
        *extra,
    ]


def create_secret(kube_api: KubeApiServer, password: str) -> str:
    """The Secret the daemon follows, with one login for `REGISTRY`; its resourceVersion."""
    return kube_api.create_secret(NS, NAME, registry_login(REGISTRY, password), type=DOCKERCONFIG)


def update_secret(kube_api: KubeApiServer, password: str) -> str:
    """A new password in the Secret the daemon follows; its resourceVersion."""
    return kube_api.update_secret(NS, NAME, registry_login(REGISTRY, password))
