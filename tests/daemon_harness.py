"""What the in-process daemon tests share: a node tree in tmp_path (`Node`), a running
daemon seen from outside (`Agent`: /metrics, Events, the node files), and settings with
short intervals (debounce 50 ms, min reload interval 1 s) so tests run in seconds."""

from __future__ import annotations

import base64
import json
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaign import NodeTree
from kubeapi import KubeApiServer
from prometheus_client.parser import text_string_to_metric_families
from support.waiting import wait_until

from node_agent.daemon.daemon import Daemon
from node_agent.daemon.run import build_daemon
from node_agent.daemon.worker import WorkerTiming
from node_agent.kube.model import ObjectRef
from node_agent.kube.secret_watch import WatchSettings
from node_agent.restart_slots.coordinator import SlotTiming
from node_agent.settings import DaemonSettings, RestartCoordination, Settings

NS = "kube-system"
FAST_SLOTS = SlotTiming(start_jitter=0.0, retry_initial=0.05, retry_max=0.2, renew_retry=0.1)
NAME = "registry-credentials"
SECRET = ObjectRef(NS, NAME)
REGISTRY = "reg.example:5000"
CRI = "io.containerd.grpc.v1.cri"
DOCKERCONFIG = "kubernetes.io/dockerconfigjson"
NODE_NAME = "node-1"

FOREIGN_TOML = f"""# node image config
version = 2

[plugins."{CRI}".registry.configs."foreign.example".auth]
  username = "theirs"
  password = "their-password"
"""
FOREIGN_JSON = '{\n  "auths": {\n    "quay.io": {\n      "auth": "cTpx"\n    }\n  }\n}\n'

FAST_WATCH = WatchSettings(
    watch_timeout_seconds=10,
    connect_timeout=1.0,
    list_read_timeout=2.0,
    watch_read_timeout=0.5,  # the test server sends a bookmark every 0.1 s
    backoff_initial=0.05,
    backoff_max=0.2,
)

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


def dockerconfig(password: str, registry: str = REGISTRY) -> dict[str, bytes]:
    document = {"auths": {registry: {"username": "puller", "password": password}}}
    return {".dockerconfigjson": json.dumps(document).encode()}


@dataclass(frozen=True)
class Node(NodeTree):
    """A node's files in tmp_path, with a foreign entry in each, and its restart log."""

    @property
    def restart_log(self) -> Path:
        return self.root / "restarts.log"

    def restart_times(self) -> list[float]:
        """Wall-clock time of each successful restart."""
        if not self.restart_log.exists():
            return []
        return [float(line) for line in self.restart_log.read_text().split()]

    def restarts(self) -> int:
        return len(self.restart_times())

    def restart_attempts(self) -> list[float]:
        """Wall-clock start of every restart attempt, failed ones included."""
        starts = self.restart_log.with_name(self.restart_log.name + ".start")
        return [float(line) for line in starts.read_text().split()] if starts.exists() else []

    @classmethod
    def create(
        cls, root: Path, *, toml: str | None = FOREIGN_TOML, json_text: str | None = FOREIGN_JSON
    ) -> Node:
        """A node tree under `root` with these tests' foreign entry in each file."""
        return super().create(root, toml=toml, json_text=json_text)

    def containerd_password(self, registry: str = REGISTRY) -> str | None:
        if not self.config_toml.exists():
            return None
        configs = tomllib.loads(self.config_toml.read_text())["plugins"][CRI]["registry"]["configs"]
        auth = configs.get(registry, {}).get("auth")
        return None if auth is None else str(auth["password"])

    def kubelet_password(self, registry: str = REGISTRY) -> str | None:
        if not self.config_json.exists():
            return None
        entry = json.loads(self.config_json.read_text())["auths"].get(registry)
        if entry is None:
            return None
        return base64.b64decode(entry["auth"]).decode().partition(":")[2]

    def passwords(self) -> tuple[str | None, str | None]:
        return self.containerd_password(), self.kubelet_password()




@dataclass
class Agent:
    daemon: Daemon
    node: Node
    kube_api: KubeApiServer
    stopped: bool = False

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.daemon.status_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        _, text = self.get("/metrics")
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value, 0 when it is absent."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def reconciles(self) -> float:
        return sum(
            self.metric("node_agent_reconcile_total", result=r)
            for r in ("applied", "noop", "error")
        )

    def events(self, reason: str) -> list[dict[str, Any]]:
        return self.kube_api.events("default", reason=reason)

    def wait_for_passwords(self, password: str | None, timeout: float = 3.0) -> float:
        return wait_until(
            lambda: self.node.passwords() == (password, password),
            timeout,
            f"both files hold {password!r}, they hold {self.node.passwords()}",
        )

    def wait_idle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Until no pass ran for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last = self.reconciles()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.reconciles()
            if now == last:
                return
            last = now
        raise AssertionError("the agent never went quiet")

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            assert self.daemon.stop(timeout=4), "the daemon did not stop in time"


def agent_settings(
    node: Node,
    kube_api: KubeApiServer,
    *,
    cri_socket: str,
    restart_script: Path | None,
    node_name: str = NODE_NAME,
    secrets: tuple[ObjectRef, ...] = (SECRET,),
    secret_files: tuple[Path, ...] = (),
    on_secret_delete: str = "remove",
    resync_interval: float = 60.0,
    restart_seconds: float = 0.0,
    restarts: RestartCoordination | None = None,
) -> DaemonSettings:
    """A daemon for `node`: restarts through `restart_script` (None: no restarts), one slot
    in NS unless `restarts` says otherwise."""
    assert kube_api.kubeconfig_path is not None
    command = (
        ("/bin/sh", str(restart_script), str(node.restart_log), str(node.config_toml))
        + ((f"{restart_seconds:g}",) if restart_seconds else ())
        if restart_script is not None
        else ()
    )
    return DaemonSettings(
        node=Settings(
            secret_files=secret_files,
            containerd_config=node.config_toml,
            kubelet_config=node.config_json,
            state_dir=node.state_dir,
            restart_mode="command" if restart_script is not None else "none",
            restart_command=command,
            restart_timeout=3.0,
            containerd_socket=Path(cri_socket),
        ),
        secrets=secrets,
        kubeconfig=kube_api.kubeconfig_path,
        on_secret_delete=on_secret_delete,
        resync_interval=resync_interval,
        debounce=0.05,
        min_restart_interval=1.0,
        node_name=node_name,
        metrics_address="127.0.0.1:0",
        events=bool(secrets),
        restarts=restarts or RestartCoordination(lease_namespace=NS, lease_ttl=10.0, settle=0.0),
    )


def start_daemon(settings: DaemonSettings, *, resync_interval: float = 60.0) -> Daemon:
    timing = WorkerTiming(
        resync_interval=resync_interval, heartbeat=1.0, retry_initial=0.05, retry_max=0.2
    )
    daemon = build_daemon(
        settings, watch_settings=FAST_WATCH, timing=timing, slot_timing=FAST_SLOTS
    )
    daemon.start()
    return daemon


def create_secret(kube_api: KubeApiServer, password: str) -> str:
    return kube_api.create_secret(NS, NAME, dockerconfig(password), type=DOCKERCONFIG)


def update_secret(kube_api: KubeApiServer, password: str) -> str:
    return kube_api.update_secret(NS, NAME, dockerconfig(password))
