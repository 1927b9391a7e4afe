"""containerd failure (RELIABILITY.md): a real containerd that does not come back
after `node-agent reconcile` restarted it, and the rollback, timed.

* CRI never answers after the restart (the restart "succeeds", containerd stays down): the
  agent waits `--reload-timeout`, restores config.toml, restarts again, and exits 1 saying so.
* The restart command itself fails: the rollback starts at once.
* Both restarts fail (in the full run): the agent says containerd is still down, keeps the
  restart pending, does not loop; once containerd can start, the next run applies.

After each: config.toml byte-for-byte as before, CRI answering, a pull that needed no
credential before behaves as before (401), the credential in no output (leak audit).
Rollback time = from the "rolled back" log line to the exit; detection = from the start to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from integration.containerd import ContainerdNode
from integration.oci_image import PushedImage
from integration.registry import AuthRegistry
from node_agent.cri import CriError

# The campaign helpers and the leak audit live in tests/, whose modules import each other as
# top-level modules; make them importable that way when integration/ runs on its own too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from campaign import campaign, is_full_scale
from leak_audit import (
    CANARY_PASSWORD,
    CANARY_USERNAME,
    LeakAudit,
    start_audit,
)
from support.agent import agent_process_env

pytestmark = pytest.mark.integration

CAMPAIGN = "containerd failure (real containerd)"
COMMAND = "NODE_AGENT_CAMPAIGN_SCALE=full pytest integration/test_campaign_containerd_failure.py"
RELOAD_TIMEOUT = 3.0


@pytest.fixture(autouse=True)
def leak_audit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeakAudit]:
    audit = start_audit(request, tmp_path)
    yield audit
    audit.finish()


@dataclass(frozen=True)
class Timed:
    code: int
    stdout: str
    stderr: str
    detection: float
    rollback: float
    total: float

    @property
    def error(self) -> str:
        """The command's one fatal error: under --log-format json, the last record, at error
        level from the `node_agent` logger."""
        records = [json.loads(line) for line in self.stderr.splitlines()]
        fatal = [r for r in records if r["logger"] == "node_agent" and r["level"] == "error"]
        assert len(fatal) == 1 and records[-1] == fatal[0], self.stderr
        return f"node-agent: error: {fatal[0]['message']}"


class Agent:
    def __init__(self, node: ContainerdNode, workdir: Path, audit: LeakAudit) -> None:
        self.node = node
        self.audit = audit
        self.secret = workdir / "secret.json"
        self.kubelet_config = workdir / "kubelet/config.json"
        self.state_dir = workdir / "state"
        self.kubelet_config.parent.mkdir()
        audit.allow(self.secret)
        audit.guard_node(files=[node.config_path, self.kubelet_config], state_dir=self.state_dir)
        audit.watch_dir(node.workdir)

    def write_secret(self, host: str) -> None:
        auths = {host: {"username": CANARY_USERNAME, "password": CANARY_PASSWORD}}
        self.secret.write_text(json.dumps({"auths": auths}))

    def reconcile(self) -> Timed:
        command = [
            sys.executable, "-m", "node_agent", "reconcile",
            "--secret-file", str(self.secret),
            "--containerd-config", str(self.node.config_path),
            "--kubelet-config", str(self.kubelet_config),
            "--state-dir", str(self.state_dir),
            "--containerd-socket", str(self.node.socket_path),
            "--reload", "command",
            "--reload-command", self.node.restart_command,
            "--reload-timeout", f"{RELOAD_TIMEOUT}s",
            "--log-format", "json",
            "--log-level", "debug",
        ]  # fmt: skip
        started_wall, started = time.time(), time.monotonic()
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, check=False,
            env=agent_process_env(),
        )  # fmt: skip
        total = time.monotonic() - started
        self.audit.check_text(result.stdout + result.stderr, "agent output")
        rolled_back = _log_time(result.stderr, "rolled back")
        ended_wall = started_wall + total
        return Timed(
            result.returncode,
            result.stdout,
            result.stderr,
            detection=(rolled_back or ended_wall) - started_wall,
            rollback=ended_wall - rolled_back if rolled_back else 0.0,
            total=total,
        )


def _log_time(stderr: str, message: str) -> float | None:
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if message in record["message"]:
                return datetime.fromisoformat(record["time"]).timestamp()
    return None


def pull(node: ContainerdNode, image: PushedImage) -> str:
    """Pull with no credentials in the request: "ok", or the error code."""
    with node.cri() as cri:
        if cri.image_present(image.reference):
            cri.remove_image(image.reference)
        try:
            cri.pull_image(image.reference)
        except CriError as error:
            return "401" if "401 Unauthorized" in error.details else error.code
    return "ok"


@pytest.fixture
def agent(containerd_node: ContainerdNode, tmp_path: Path, leak_audit: LeakAudit) -> Agent:
    return Agent(containerd_node, tmp_path, leak_audit)


def repeats() -> int:
    return 5 if is_full_scale() else 1


@pytest.mark.parametrize(
    ("failure", "exit_code"),
    [("CRI never answers", 0), ("the restart command fails", 1)],
)
def test_a_restart_that_leaves_containerd_down_is_rolled_back_within_the_timeout(
    failure: str,
    exit_code: int,
    agent: Agent,
    auth_registry: AuthRegistry,
    pushed_image: PushedImage,
    record_property: Any,
) -> None:
    with campaign(record_property, CAMPAIGN, command=COMMAND) as tally:
        original = agent.node.config_path.read_bytes()
        assert pull(agent.node, pushed_image) == "401"
        agent.write_secret(auth_registry.host)
        runs: list[Timed] = []
        for _ in range(repeats()):
            agent.node.break_next_restart(exit_code=exit_code)
            run = agent.reconcile()
            runs.append(run)
            tally.cases += 1
            restored = agent.node.config_path.read_bytes() == original
            tally.data_lost += not restored
            assert run.code == 1
            assert "previous config.toml restored and containerd restarted healthy" in run.error
            assert restored
            assert agent.node.cri_ready()
            assert run.rollback <= RELOAD_TIMEOUT
            if exit_code == 0:
                assert RELOAD_TIMEOUT - 0.5 <= run.detection <= RELOAD_TIMEOUT + 3.0
            else:
                assert run.detection <= RELOAD_TIMEOUT
            state = json.loads((agent.state_dir / "owned.json").read_text())
            assert state["containerd_restart_pending"] is False
        assert pull(agent.node, pushed_image) == "401"  # the node pulls as it did before
        tally.notes.append(
            f"{failure} (x{len(runs)}, --reload-timeout {RELOAD_TIMEOUT:g}s): detected after "
            f"{_span(r.detection for r in runs)}, rolled back in {_span(r.rollback for r in runs)}"
            f", exit after {_span(r.total for r in runs)}"
        )


def _span(values: Iterable[float]) -> str:
    ordered = sorted(values)
    low, high = f"{ordered[0]:.1f}", f"{ordered[-1]:.1f}"
    return f"{low}s" if low == high else f"{low}-{high}s"


def test_when_containerd_cannot_start_at_all_the_agent_stops_and_retries_only_when_run_again(
    agent: Agent, auth_registry: AuthRegistry, record_property: Any
) -> None:
    if not is_full_scale():
        pytest.skip("full campaign only (NODE_AGENT_CAMPAIGN_SCALE=full)")
    with campaign(record_property, CAMPAIGN, command=COMMAND) as tally:
        tally.cases = 1
        original = agent.node.config_path.read_bytes()
        agent.write_secret(auth_registry.host)
        # A directory where containerd's socket goes: every stop and start fails.
        agent.node.socket_path.unlink()
        agent.node.socket_path.mkdir()
        try:
            run = agent.reconcile()
            assert run.code == 1
            assert "config rolled back, but containerd still failed" in run.error
            assert agent.node.config_path.read_bytes() == original
            state = json.loads((agent.state_dir / "owned.json").read_text())
            assert state["containerd_restart_pending"] is True
            tally.notes.append(f"both restarts failing: exit after {run.total:.1f}s")
        finally:
            agent.node.socket_path.rmdir()
            agent.node.stop()
            agent.node.start()
        run = agent.reconcile()
        assert run.code == 0, run.stderr
        assert "containerd: restarted, CRI answering" in run.stdout
        assert agent.node.cri_ready()
