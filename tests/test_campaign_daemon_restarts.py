"""At most one containerd restart attempt per `--min-reload-interval` (RELIABILITY.md):
the daemon in this process facing a containerd that never comes back, over a run of many
intervals while the Secret keeps changing.

containerd is a restart command (a script logging each call: whether config.toml held the
agent's new entry, i.e. an attempt, or not, i.e. the restart after a rollback; and a checksum
of the file it "started" on) and a fake CRI (tests/fake_cri.py) for the health check. Three
ways to never be healthy:

- the restart command always fails (containerd cannot start at all);
- the restart command succeeds but CRI never answers (containerd up, CRI plugin down);
- containerd rejects the new config: it fails with the agent's entry and starts without it.

Invariants: attempts are at least one interval apart, so at most 1 + run/interval of them
(rollback restarts, one per failed attempt, counted separately); the agent does retry (no
give-up) but never in a loop; every rollback restarts containerd on the config.toml as it was,
and the file ends byte-for-byte as it was; kubelet's config.json follows the Secret anyway;
`node_agent_containerd_restarts_total{result}` counts exactly the attempts; each distinct
failure is one Event whose count grows, not an Event per retry.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from campaign import (
    NodeMonitor,
    SecretVersions,
    agent_passwords,
    campaign,
    campaign_size,
    is_full_scale,
)
from fake_cri import CONTAINERD_VERSION, FakeCri
from kubeapi import KubeApiServer
from leak_audit import LeakAudit
from support.agent import running_in_process
from support.node import FOREIGN_TOML, REGISTRY, NodeTree
from support.settings import TimeScale, scaled_settings
from support.waiting import wait_until

CAMPAIGN = "daemon: one restart attempt per interval"
COMMAND = "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_daemon_restarts.py"
RELOAD_TIMEOUT = 0.2

# $1 log, $2 config.toml, $3 mode: fail (never starts) | reject (fails on the agent's entry) |
# ok. An "attempt" is a restart on a config.toml holding the agent's entry.
RESTART_SCRIPT = f"""#!/bin/sh
if grep -q '{REGISTRY}' "$2"; then kind=attempt; else kind=rollback; fi
sum=$(sha256sum < "$2" | cut -c1-64)
result=ok
if [ "$3" = fail ] || {{ [ "$3" = reject ] && [ "$kind" = attempt ]; }}; then result=failed; fi
echo "$(date +%s.%N) $kind $result $sum" >> "$1"
if [ "$result" = failed ]; then echo "containerd: failed to load config" >&2; exit 1; fi
"""

pytestmark = pytest.mark.usefixtures("leak_audit")


@dataclass(frozen=True)
class Failure:
    """One way containerd never becomes healthy with the agent's config."""

    script_mode: str
    cri_answers: bool
    result: str
    """The `result` label every attempt must be counted under."""
    event: str


FAILURES = {
    "the restart command always fails": Failure(
        "fail", True, "failed", "RegistryCredentialsReconcileFailed"
    ),
    "CRI never answers": Failure("ok", False, "failed", "RegistryCredentialsReconcileFailed"),
    "containerd rejects the new config": Failure(
        "reject", True, "rolled_back", "ContainerdRestartRolledBack"
    ),
}


@dataclass(frozen=True)
class Restart:
    at: float
    kind: str  # attempt | rollback
    result: str  # ok | failed
    config_sha256: str


def restarts(log: Path) -> list[Restart]:
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines()]
    return [Restart(float(at), kind, result, digest) for at, kind, result, digest in lines]


@pytest.fixture
def node(tmp_path: Path, leak_audit: LeakAudit, caplog: pytest.LogCaptureFixture) -> NodeTree:
    caplog.set_level(logging.DEBUG, logger="node_agent")
    node = NodeTree.create(tmp_path / "node")
    leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
    return node


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """For the CRI socket (unix socket paths are short)."""
    directory = Path(tempfile.mkdtemp(prefix="na-cri-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_containerd_that_never_comes_back_gets_one_attempt_per_interval(
    failure: str,
    node: NodeTree,
    kube_api: KubeApiServer,
    short_dir: Path,
    tmp_path: Path,
    record_property: Any,
) -> None:
    how = FAILURES[failure]
    interval = 1.0 if is_full_scale() else 0.4
    run_for = interval * campaign_size(quick=6, full=15)
    script, log = tmp_path / "restart.sh", tmp_path / "restarts.log"
    script.write_text(RESTART_SCRIPT)
    version = CONTAINERD_VERSION if how.cri_answers else None  # None: CRI plugin down
    cri = FakeCri(str(short_dir / "cri.sock"), version=version).start()
    original_sha = hashlib.sha256(FOREIGN_TOML.encode()).hexdigest()
    versions = SecretVersions(kube_api)
    versions.publish()
    settings = scaled_settings(
        node,
        kube_api,
        scale=TimeScale(100),
        restart_command=("/bin/sh", str(script), str(log), str(node.config_toml), how.script_mode),
        cri_socket=short_dir / "cri.sock",
        restart_timeout=RELOAD_TIMEOUT,
        min_restart_interval=interval,
    )
    try:
        with (
            campaign(record_property, CAMPAIGN, command=COMMAND) as tally,
            NodeMonitor(node, versions) as monitor,  # removal allowed: a rollback removes it
            running_in_process(settings, node, kube_api, TimeScale(100).timings()) as agent,
        ):
            started = time.monotonic()
            while time.monotonic() - started < run_for:  # changes keep coming meanwhile
                time.sleep(interval / 3)
                versions.publish()
            wait_until(
                lambda: agent_passwords(node)[1] == versions.last,
                timeout=5,
                what="kubelet's file follows the Secret without a restart",
            )
            agent.stop()
            elapsed = time.monotonic() - started

            calls = restarts(log)
            attempts = [call for call in calls if call.kind == "attempt"]
            rollbacks = [call for call in calls if call.kind == "rollback"]
            tally.cases += len(attempts)
            tally.outcomes[f"{failure}: attempts"] += len(attempts)
            tally.outcomes[f"{failure}: rollback restarts"] += len(rollbacks)
            gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
            tally.notes.append(
                f"{failure}: {len(attempts)} attempts in {elapsed:.1f} s, interval {interval:g} s, "
                f"shortest gap {min(gaps, default=0):.2f} s"
            )

            assert len(attempts) >= 2, "the agent gave up instead of retrying"
            assert len(attempts) <= 1 + elapsed / interval
            assert min(gaps) >= interval * 0.75, f"attempts closer than the interval: {gaps}"
            assert len(rollbacks) == len(attempts), "one rollback restart per failed attempt"
            assert {call.config_sha256 for call in rollbacks} == {original_sha}
            assert node.config_toml.read_text() == FOREIGN_TOML
            assert agent_passwords(node) == (None, versions.last)

            assert agent.metric("node_agent_containerd_restarts_total", result=how.result) == len(
                attempts
            )
            others = {"success", "rolled_back", "failed"} - {how.result}
            assert all(
                agent.metric("node_agent_containerd_restarts_total", result=r) == 0 for r in others
            )
            assert agent.metric("node_agent_in_sync", target="containerd") == 0
            wait_until(
                lambda: sum(e["count"] for e in agent.events(how.event)) == len(attempts),
                timeout=5,
                what=f"{how.event} counted once per attempt",
            )
            events = agent.events(how.event)
            assert {e["type"] for e in events} == {"Warning"}
            monitor.check_now()
            tally.failures += len(monitor.violations)
            tally.data_lost += monitor.data_lost
            monitor.assert_clean()
            # One Event whose count grows: every retry fails with the same message.
            assert len(events) == 1, [e["message"] for e in events]
    finally:
        cri.stop()


def test_the_restart_script_tells_attempts_from_rollbacks(tmp_path: Path) -> None:
    """The campaign's containerd stand-in, checked on its own."""
    script, log, config = tmp_path / "restart.sh", tmp_path / "log", tmp_path / "config.toml"
    script.write_text(RESTART_SCRIPT)
    config.write_text(FOREIGN_TOML)
    assert os.system(f"/bin/sh {script} {log} {config} reject") == 0
    config.write_text(FOREIGN_TOML + f'# "{REGISTRY}"\n')
    assert os.system(f"/bin/sh {script} {log} {config} reject 2>/dev/null") != 0
    assert [(r.kind, r.result) for r in restarts(log)] == [
        ("rollback", "ok"),
        ("attempt", "failed"),
    ]
