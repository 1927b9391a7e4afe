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
import json
import os
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, settings

from node_agent.cli import main

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
    ) -> NodeTree:
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
