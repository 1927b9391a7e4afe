"""Shared pieces of the reliability campaigns (RELIABILITY.md): how big a run is, the figures
each campaign reports, a node tree on disk with foreign content, and the CLI driven
in-process or as a child process.

Size: `NODE_AGENT_CAMPAIGN_SCALE` is `quick` (default: the reduced counts `make test` runs),
`full` (`make reliability`) or a number, a fraction of the full counts.
`NODE_AGENT_CAMPAIGN_SEED` fixes the random choices (default: a fixed seed, so a run is
reproducible; the seed is in every failure message).
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

import pytest
from hypothesis import HealthCheck, settings
from kubeapi import KubeApiServer
from leak_audit import CANARY_PASSWORD, CANARY_USERNAME
from prometheus_client.parser import text_string_to_metric_families
from support.waiting import wait_until

from node_agent.cli import main
from node_agent.daemon.daemon import Daemon
from node_agent.daemon.run import build_daemon
from node_agent.daemon.worker import WorkerTiming
from node_agent.kube.model import ObjectRef
from node_agent.kube.secret_watch import WatchSettings
from node_agent.settings import DaemonSettings, RestartCoordination, Settings

SCALE_ENV = "NODE_AGENT_CAMPAIGN_SCALE"
SEED_ENV = "NODE_AGENT_CAMPAIGN_SEED"
DEFAULT_SEED = 20261125
CAMPAIGN_PROPERTY = "campaign"
CRI = "io.containerd.grpc.v1.cri"
REPO = Path(__file__).resolve().parent.parent


def campaign_size(*, quick: int, full: int) -> int:
    """How many cases a campaign runs at the configured scale."""
    scale = os.environ.get(SCALE_ENV, "quick").strip().lower()
    if scale in ("", "quick"):
        return quick
    if scale == "full":
        return full
    try:
        fraction = float(scale)
    except ValueError:
        raise pytest.UsageError(f"{SCALE_ENV} must be quick, full or a number") from None
    return max(1, round(full * fraction))


def is_full_scale() -> bool:
    return os.environ.get(SCALE_ENV, "quick").strip().lower() == "full"


def fuzz_settings(*, quick: int, full: int) -> settings:
    """hypothesis settings of a fuzz campaign: reproducible at the reduced size, random at
    full size."""
    return settings(
        max_examples=campaign_size(quick=quick, full=full),
        deadline=None,
        derandomize=not is_full_scale(),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def campaign_seed() -> int:
    return int(os.environ.get(SEED_ENV, DEFAULT_SEED))


# --- figures -------------------------------------------------------------------------------


@dataclass
class Tally:
    """The figures of one campaign test, reported in the terminal summary."""

    campaign: str
    command: str
    cases: int = 0
    failures: int = 0
    data_lost: int = 0
    notes: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    """How cases ended (e.g. applied, refused), summed over the campaign's tests."""


class _RecordProperty(Protocol):
    def __call__(self, name: str, value: object) -> None: ...


@contextmanager
def campaign(record_property: _RecordProperty, name: str, *, command: str) -> Iterator[Tally]:
    """Count cases in the block; the figures are recorded whatever happens. An exception
    out of the block counts as one failure if the block counted none."""
    tally = Tally(name, command)
    started = time.monotonic()
    status = "ran"
    try:
        yield tally
    except pytest.skip.Exception:
        status = "skipped"
        raise
    except BaseException:
        tally.failures = max(tally.failures, 1)
        raise
    finally:
        row = {
            "campaign": tally.campaign,
            "cases": tally.cases,
            "failures": tally.failures,
            "data_lost": tally.data_lost,
            "seconds": round(time.monotonic() - started, 2),
            "command": tally.command,
            "status": status,
            "notes": tally.notes,
            "outcomes": dict(tally.outcomes),
        }
        record_property(CAMPAIGN_PROPERTY, row)


def campaign_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A markdown table of the recorded rows, one line per campaign."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        total = merged.setdefault(
            row["campaign"],
            {
                "cases": 0,
                "failures": 0,
                "data_lost": 0,
                "seconds": 0.0,
                "skipped": 0,
                "command": row["command"],
                "notes": [],
                "outcomes": Counter(),
            },
        )
        for key in ("cases", "failures", "data_lost", "seconds"):
            total[key] += row[key]
        total["skipped"] += row["status"] == "skipped"
        total["notes"].extend(row["notes"])
        total["outcomes"].update(row.get("outcomes", {}))
    lines = [
        "| campaign | cases run | failures | data lost | seconds | skipped tests | command |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, total in merged.items():
        lines.append(
            f"| {name} | {total['cases']} | {total['failures']} | {total['data_lost']} "
            f"| {total['seconds']:.1f} | {total['skipped']} | `{total['command']}` |"
        )
    for name, total in merged.items():
        outcomes = [f"{what} {count}" for what, count in sorted(total["outcomes"].items())]
        if outcomes or total["notes"]:
            lines.append(f"- {name}: {'; '.join(outcomes + total['notes'])}")
    return lines


# --- a node on disk --------------------------------------------------------------------------

FOREIGN_TOML = f"""# Written by the node image. The agent must keep every byte it does not own.
version = 2
root = "/var/lib/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]

  [plugins."{CRI}"]
    sandbox_image = "registry.k8s.io/pause:3.9"

    [plugins."{CRI}".containerd]
      snapshotter = "overlayfs"

    [plugins."{CRI}".registry]
      config_path = "/etc/containerd/certs.d"

      [plugins."{CRI}".registry.configs]

        # a login someone made by hand
        [plugins."{CRI}".registry.configs."foreign.example".auth]
          username = "theirs"
          password = "their-password"

        [plugins."{CRI}".registry.configs."tls-only.example".tls]
          insecure_skip_verify = true
"""
FOREIGN_JSON = """{
  "auths": {
    "https://index.docker.io/v1/": {
      "auth": "aHViLXVzZXI6aHViLXBhc3M="
    },
    "quay.io": {
      "auth": "cTpx"
    }
  },
  "HttpHeaders": {
    "User-Agent": "Docker-Client/24.0"
  }
}
"""
#: Registry entries present before the agent, as each file holds them.
FOREIGN_TOML_AUTHS = {"foreign.example": {"username": "theirs", "password": "their-password"}}
FOREIGN_JSON_AUTHS = {
    "https://index.docker.io/v1/": {"auth": "aHViLXVzZXI6aHViLXBhc3M="},
    "quay.io": {"auth": "cTpx"},
}


def basic_auth(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass(frozen=True)
class NodeTree:
    """A node's two files and the agent's state dir under one directory, plus the Secret."""

    root: Path

    @property
    def config_toml(self) -> Path:
        return self.root / "etc/containerd/config.toml"

    @property
    def config_json(self) -> Path:
        return self.root / "var/lib/kubelet/config.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/node-agent"

    @property
    def secret(self) -> Path:
        return self.root / "secret/config.json"

    @property
    def targets(self) -> tuple[Path, Path]:
        return self.config_toml, self.config_json

    @classmethod
    def create(
        cls, root: Path, *, toml: str | None = FOREIGN_TOML, json_text: str | None = FOREIGN_JSON
    ) -> Self:
        node = cls(root)
        for path, text in ((node.config_toml, toml), (node.config_json, json_text)):
            path.parent.mkdir(parents=True, exist_ok=True)
            if text is not None:
                path.write_text(text)
        node.secret.parent.mkdir(parents=True, exist_ok=True)
        return node

    def write_secret(self, auths: dict[str, dict[str, str]]) -> None:
        self.secret.write_text(json.dumps({"auths": auths}))

    def write_secret_bytes(self, payload: bytes) -> None:
        self.secret.write_bytes(payload)

    def flags(self, *extra: str) -> list[str]:
        """`reconcile` flags for this tree (`--reload none` unless `extra` has a `--reload`)."""
        reload = [] if "--reload" in extra else ["--reload", "none"]
        return [
            "--secret-file",
            str(self.secret),
            "--containerd-config",
            str(self.config_toml),
            "--kubelet-config",
            str(self.config_json),
            "--state-dir",
            str(self.state_dir),
            *reload,
            *extra,
        ]

    def contents(self) -> dict[str, bytes | None]:
        """Both node files and owned.json as bytes (None: absent)."""
        return {
            "config.toml": _read_or_none(self.config_toml),
            "config.json": _read_or_none(self.config_json),
            "owned.json": _read_or_none(self.state_dir / "owned.json"),
        }

    def temp_files(self) -> list[Path]:
        """Leftover temp files of the agent beside the node files and in the state dir."""
        directories = {self.config_toml.parent, self.config_json.parent, self.state_dir}
        for target in self.targets:
            if target.is_symlink():
                with suppress(OSError, RuntimeError):  # RuntimeError: a loop
                    directories.add(target.resolve().parent)
        return sorted(
            path
            for directory in directories
            if directory.is_dir()
            for path in directory.iterdir()
            if ".node-agent-" in path.name
        )


def _read_or_none(path: Path) -> bytes | None:
    """The file's bytes; None when absent. Never opens anything but a regular file (a FIFO
    would block): other kinds read as a marker such as `<not a regular file: 10644>`."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as error:  # a symlink loop
        return f"<{error.strerror}>".encode()
    if not stat.S_ISREG(mode):
        return f"<not a regular file: {mode:o}>".encode()
    return path.read_bytes()


# --- the CLI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("node-agent: error:")]


class _Audit(Protocol):
    def read_output(self) -> Any: ...


def run_cli(audit: _Audit, argv: Sequence[str]) -> CliRun:
    """`node-agent ARGV` in this process, with no NODE_AGENT_* variables. Anything but an
    exit code (an exception that is not a NodeAgentError) propagates: that is a traceback."""
    code = main(list(argv), environ={})
    output = audit.read_output()
    return CliRun(code, output.out, output.err)


def agent_process_env() -> dict[str, str]:
    """The environment for a child agent: ours without NODE_AGENT_* settings."""
    return {key: value for key, value in os.environ.items() if not key.startswith("NODE_AGENT_")}


def run_cli_process(argv: Sequence[str], *, timeout: float = 60) -> CliRun:
    """`python -m node_agent ARGV` as a child process."""
    result = subprocess.run(
        [sys.executable, "-m", "node_agent", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=agent_process_env(),
        cwd=REPO,
    )
    return CliRun(result.returncode, result.stdout, result.stderr)


# --- the daemon (`node-agent run`) -----------------------------------------------------------
#
# The daemon campaigns (tests/test_campaign_daemon_*.py) run the daemon in this process
# (`build_daemon`, the real `kubernetes` client against tests/kubeapi.py) or as a child
# (`node-agent run`), always without restart slots (`--restart-concurrency 0`).

SECRET_NAMESPACE = "kube-system"
SECRET_NAME = "registry-credentials"
SECRET_REF = f"{SECRET_NAMESPACE}/{SECRET_NAME}"
DOCKERCONFIG_TYPE = "kubernetes.io/dockerconfigjson"
NODE_NAME = "node-1"
DAEMON_REGISTRY = "reg.example:5000"
TARGET_NAMES = ("containerd", "kubelet")




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


def dockerconfig_data(registry: str, username: str, password: str) -> dict[str, bytes]:
    document = {"auths": {registry: {"username": username, "password": password}}}
    return {".dockerconfigjson": json.dumps(document).encode()}


@dataclass
class SecretVersions:
    """The Secret the daemon follows, changed through the test API server. Every valid version
    has a password of its own (the canary's, plus a serial), so a node file tells which
    version it holds; `published` lists them oldest first."""

    kube_api: KubeApiServer
    registry: str = DAEMON_REGISTRY
    published: list[str] = field(default_factory=list)
    exists: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def last(self) -> str:
        return self.published[-1]

    def publish(self, *, also: Sequence[str] = ()) -> str:
        """A new valid version; its password. `also`: more registries with the same
        credentials (a change to what the agent owns, not just a rotation)."""
        with self._lock:
            password = f"{CANARY_PASSWORD}-v{len(self.published)}"
            self.published.append(password)  # known before anyone can read it
        entry = {"username": CANARY_USERNAME, "password": password}
        document = {"auths": dict.fromkeys([self.registry, *also], entry)}
        self._put({".dockerconfigjson": json.dumps(document).encode()}, DOCKERCONFIG_TYPE)
        return password

    def publish_invalid(self, data: Mapping[str, bytes], *, type: str = DOCKERCONFIG_TYPE) -> None:
        """Content the agent must refuse (it keeps the last valid version)."""
        self._put(data, type)

    def delete(self) -> None:
        self.kube_api.delete_secret(SECRET_NAMESPACE, SECRET_NAME)
        self.exists = False

    def index(self, password: str) -> int | None:
        with self._lock:
            return self.published.index(password) if password in self.published else None

    def _put(self, data: Mapping[str, bytes], type: str) -> None:
        if self.exists:
            self.kube_api.update_secret(SECRET_NAMESPACE, SECRET_NAME, data, type=type)
        else:
            self.kube_api.create_secret(SECRET_NAMESPACE, SECRET_NAME, data, type=type)
            self.exists = True


def agent_passwords(
    node: NodeTree, registry: str = DAEMON_REGISTRY
) -> tuple[str | None, str | None]:
    """The password the agent's entry holds in config.toml and in config.json (None: no
    entry). Raises if a file is not parseable."""
    return (
        _toml_password(tomllib.loads(node.config_toml.read_text()), registry),
        _json_password(json.loads(node.config_json.read_text()), registry),
    )


def _toml_password(document: dict[str, Any], registry: str) -> str | None:
    configs = document.get("plugins", {}).get(CRI, {}).get("registry", {}).get("configs", {})
    auth = configs.get(registry, {}).get("auth")
    return None if auth is None else str(auth.get("password"))


def _json_password(document: dict[str, Any], registry: str) -> str | None:
    entry = document.get("auths", {}).get(registry)
    if entry is None:
        return None
    return base64.b64decode(entry["auth"]).decode().partition(":")[2]


def _without_toml_entry(document: dict[str, Any], registry: str) -> dict[str, Any]:
    configs = document.get("plugins", {}).get(CRI, {}).get("registry", {}).get("configs", {})
    configs.pop(registry, None)
    return document


def _without_json_entry(document: dict[str, Any], registry: str) -> dict[str, Any]:
    document.get("auths", {}).pop(registry, None)
    return document


@dataclass
class NodeMonitor:
    """Reads both node files continuously on a thread (each new version, by stat, polled every
    ~2 ms) and on demand (`check_now`), and records every version that breaks the daemon
    campaigns' invariants:

    - the file exists and parses (never half-written), and everything the agent does not own
      is exactly the foreign content it started with (data lost otherwise);
    - the agent's entry is there unless `removal_allowed` (a confirmed delete): an API fault
      or an invalid Secret never removes credentials (data lost otherwise);
    - its password is one of the published valid versions, and never older than one the
      same file already held.
    """

    node: NodeTree
    versions: SecretVersions
    foreign_toml: str = FOREIGN_TOML
    foreign_json: str = FOREIGN_JSON
    removal_allowed: bool = True
    """True until the agent first applied the Secret; the test sets it."""
    poll_interval: float = 0.002
    violations: list[str] = field(default_factory=list)
    data_lost: int = 0
    versions_checked: int = 0
    _newest: dict[str, int] = field(default_factory=dict)
    _seen: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> NodeMonitor:
        self._thread = threading.Thread(target=self._run, name="node-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.check_now()

    def check_now(self) -> None:
        """Check both files as they are now (after a step), changed or not."""
        for path in self.node.targets:
            self._check(path, force=True)

    def assert_clean(self) -> None:
        with self._lock:
            assert not self.violations, "node invariants broken:\n  " + "\n  ".join(
                self.violations[:20]
            )

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_interval):
            for path in self.node.targets:
                self._check(path, force=False)

    def _check(self, path: Path, *, force: bool) -> None:
        with self._lock:
            try:
                info = path.stat()
                identity: tuple[int, ...] | None = (
                    info.st_ino,
                    info.st_mtime_ns,
                    info.st_ctime_ns,
                    info.st_size,
                )
            except FileNotFoundError:
                identity = None
            if not force and path.name in self._seen and self._seen[path.name] == identity:
                return
            self._seen[path.name] = identity
            try:
                content = path.read_bytes()
            except FileNotFoundError:
                content = None
            self.versions_checked += 1
            for problem, lost in self._problems(path, content):
                self.violations.append(f"{path.name}: {problem}")
                self.data_lost += lost

    def _problems(self, path: Path, content: bytes | None) -> list[tuple[str, bool]]:
        if content is None:
            return [("the file is gone", True)]
        registry = self.versions.registry
        try:
            if path.suffix == ".toml":
                document = tomllib.loads(content.decode())
                password = _toml_password(document, registry)
                foreign = _without_toml_entry(document, registry) == tomllib.loads(
                    self.foreign_toml
                )
            else:
                document = json.loads(content)
                password = _json_password(document, registry)
                foreign = _without_json_entry(document, registry) == json.loads(self.foreign_json)
        except (ValueError, UnicodeDecodeError, KeyError, AttributeError) as error:
            return [(f"not a complete file ({error})", True)]
        problems = [] if foreign else [("foreign content changed or lost", True)]
        if password is None:
            if not self.removal_allowed:
                problems.append(("the agent's credentials were removed", True))
            return problems
        index = self.versions.index(password)
        if index is None:
            problems.append(("holds a password that was never published as valid", False))
        elif index < self._newest.get(path.name, -1):
            problems.append((f"went back from v{self._newest[path.name]} to v{index}", False))
        else:
            self._newest[path.name] = index
        return problems


@dataclass
class RunningDaemon:
    """A daemon built by `build_daemon` and started in this process; metrics straight from its
    registry, Events from the test API server."""

    daemon: Daemon
    kube_api: KubeApiServer
    stopped: bool | None = None

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value; 0 when absent."""
        value = self.daemon.parts.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    def reconciles(self, result: str) -> float:
        return self.metric("node_agent_reconcile_total", result=result)

    def passes(self) -> float:
        """Passes so far, whatever their result."""
        return sum(self.reconciles(result) for result in ("applied", "noop", "error"))

    def wait_idle(self, *, quiet: float = 0.1, timeout: float = 5.0) -> None:
        """Until no pass ended for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last = self.passes()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            if (now := self.passes()) == last:
                return
            last = now
        raise AssertionError("the daemon never went idle")

    def wait_for_a_pass(self, *, timeout: float) -> None:
        """Until one more pass (of any result) has run."""
        before = self.passes()
        wait_until(lambda: self.passes() > before, timeout=timeout, what="one more pass")

    def in_sync(self) -> bool:
        return all(self.metric("node_agent_in_sync", target=t) == 1 for t in TARGET_NAMES)

    def events(self, reason: str) -> list[dict[str, Any]]:
        return self.kube_api.events("default", reason=reason)

    def stop(self) -> bool:
        if self.stopped is None:
            self.stopped = self.daemon.stop(timeout=5)
        return self.stopped


@contextmanager
def running_daemon(
    settings: DaemonSettings, kube_api: KubeApiServer, *, scale: TimeScale
) -> Iterator[RunningDaemon]:
    drop_closed_log_handlers()
    daemon = build_daemon(settings, watch_settings=scale.watch(), timing=scale.worker())
    running = RunningDaemon(daemon, kube_api)
    daemon.start()
    try:
        yield running
    finally:
        running.stop()


def drop_closed_log_handlers() -> None:
    """An earlier test that ran the CLI in this process (`configure_logging`) left a root
    handler writing to its own, since closed, captured stderr: every record of the daemon
    would then print a "Logging error" traceback, slowing it down by orders of magnitude."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            root.removeHandler(handler)


def daemon_settings(
    node: NodeTree,
    kube_api: KubeApiServer,
    *,
    scale: TimeScale,
    restart_command: Sequence[str] = (),
    cri_socket: Path | None = None,
    restart_timeout: float = 3.0,
    min_restart_interval: float | None = None,
) -> DaemonSettings:
    """`node-agent run --secret kube-system/registry-credentials` for `node`, Events on,
    metrics on a free port, timings compressed by `scale`, no restart slots."""
    assert kube_api.kubeconfig_path is not None
    return DaemonSettings(
        node=Settings(
            containerd_config=node.config_toml,
            kubelet_config=node.config_json,
            state_dir=node.state_dir,
            restart_mode="command" if restart_command else "none",
            restart_command=tuple(restart_command),
            restart_timeout=restart_timeout,
            containerd_socket=cri_socket or node.root / "no-containerd.sock",
            log_level="debug",
        ),
        secrets=(ObjectRef(SECRET_NAMESPACE, SECRET_NAME),),
        kubeconfig=kube_api.kubeconfig_path,
        resync_interval=scale(300),
        debounce=scale(0.2),
        min_restart_interval=scale(30) if min_restart_interval is None else min_restart_interval,
        node_name=NODE_NAME,
        metrics_address="127.0.0.1:0",
        events=True,
        restarts=RestartCoordination(concurrency=0),
    )


# --- the daemon as a child process ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class AgentProcess:
    """`node-agent run` as a child (optionally under a wrapper such as `capsh ... -c`), its
    log in a file, its metrics over HTTP."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, argv: Sequence[str], *, log: Path, wrapper: Sequence[str] = ()) -> AgentProcess:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "node_agent",
            "run",
            *argv,
            "--metrics-address",
            f"127.0.0.1:{port}",
        ]
        if wrapper:
            command = [*wrapper, shlex.join(command)]
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                env=agent_process_env(),
                cwd=REPO,
            )
        return cls(process, port, log)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return {}  # not serving yet
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def in_sync(self) -> bool:
        metrics = self.metrics()
        return all(
            metrics.get(("node_agent_in_sync", frozenset({("target", t)})), 0) == 1
            for t in TARGET_NAMES
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM; the exit code (the child is killed if it does not end in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def daemon_argv(
    node: NodeTree,
    kube_api: KubeApiServer,
    *,
    restart_command: str | None = None,
    cri_socket: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`node-agent run` flags for `node` following the campaign Secret, no restart slots."""
    assert kube_api.kubeconfig_path is not None
    reload = ["--reload", "none"]
    if restart_command is not None:
        reload = ["--reload", "command", "--reload-command", restart_command]
    return [
        "--secret",
        SECRET_REF,
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


def fill_filesystem(directory: Path) -> None:
    """Fill the filesystem of `directory` up to the last byte (with a file named `filler`)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as error:
                    assert error.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
