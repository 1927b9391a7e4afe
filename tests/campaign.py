"""Shared pieces of the reliability campaigns (RELIABILITY.md): how big a run is, the figures
each campaign reports, the CLI driven in-process or as a child process, and the daemon
campaigns' Secret versions and node monitor. The node tree and the agent harnesses are in
tests/support.

Size: `NODE_AGENT_CAMPAIGN_SCALE` is `quick` (default: the reduced counts `make test` runs),
`full` (`make reliability`) or a number, a fraction of the full counts.
`NODE_AGENT_CAMPAIGN_SEED` fixes the random choices (default: a fixed seed, so a run is
reproducible; the seed is in every failure message).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, settings
from kubeapi import KubeApiServer
from leak_audit import CANARY_PASSWORD, CANARY_USERNAME
from support.agent import REPO, agent_process_env
from support.dockerconfig import DOCKERCONFIG, login, secret_data
from support.node import CRI, FOREIGN_JSON, FOREIGN_TOML, REGISTRY, NodeTree
from support.settings import NAME, NS

from node_agent.cli import main

SCALE_ENV = "NODE_AGENT_CAMPAIGN_SCALE"
SEED_ENV = "NODE_AGENT_CAMPAIGN_SEED"
DEFAULT_SEED = 20261125
CAMPAIGN_PROPERTY = "campaign"


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
# (`support.agent.running_in_process`) or as a child (`support.agent.AgentProcess`), always
# without restart slots (`support.settings.scaled_settings`, `daemon_argv`).


@dataclass
class SecretVersions:
    """The Secret the daemon follows, changed through the test API server. Every valid version
    has a password of its own (the canary's, plus a serial), so a node file tells which
    version it holds; `published` lists them oldest first."""

    kube_api: KubeApiServer
    registry: str = REGISTRY
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
        entry = login(password, username=CANARY_USERNAME)
        self._put(secret_data(dict.fromkeys([self.registry, *also], entry)), DOCKERCONFIG)
        return password

    def publish_invalid(self, data: Mapping[str, bytes], *, type: str = DOCKERCONFIG) -> None:
        """Content the agent must refuse (it keeps the last valid version)."""
        self._put(data, type)

    def delete(self) -> None:
        self.kube_api.delete_secret(NS, NAME)
        self.exists = False

    def index(self, password: str) -> int | None:
        with self._lock:
            return self.published.index(password) if password in self.published else None

    def _put(self, data: Mapping[str, bytes], type: str) -> None:
        if self.exists:
            self.kube_api.update_secret(NS, NAME, data, type=type)
        else:
            self.kube_api.create_secret(NS, NAME, data, type=type)
            self.exists = True


def agent_passwords(node: NodeTree, registry: str = REGISTRY) -> tuple[str | None, str | None]:
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
