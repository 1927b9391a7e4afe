"""Concurrent writers (RELIABILITY.md): another process rewrites config.toml and
config.json in a tight loop while `node-agent run` (a child process, real timings) reconciles
and the Secret keeps changing.

The other writer behaves like a careful tool (`docker login`, a config management agent): it
reads the file, changes only its own entries (a `writer.example` login and a generation
marker, new every time), keeps everything else, and writes it back, by rename on odd
generations and in place on even ones. Before each write it checks that the file still holds
its previous generation: if not, someone overwrote its update. If it is back within 100 ms
the agent noticed and put it back (its compare-and-swap exchanges the files and checks what
came out; counted, reported); if not, the update is lost (data lost).

Afterwards: no lost update of the other writer's, its last generation in both files, the
agent's entries there with the last Secret version, foreign content intact, in sync; and the
agent did not fight: a bounded number of containerd restarts (a fake restart command counts
them) and bounded CPU time (the agent's own `process_cpu_seconds_total`, printed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from campaign import SecretVersions, agent_passwords, campaign, campaign_size
from kubeapi import KubeApiServer
from leak_audit import LeakAudit
from support.agent import AgentProcess
from support.node import CRI, FOREIGN_JSON, FOREIGN_TOML, NodeTree
from support.settings import daemon_argv
from support.waiting import wait_until

CAMPAIGN = "daemon: concurrent writers"
COMMAND = "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_daemon_concurrent_writers.py"
MIN_RELOAD_INTERVAL = 1.0
WRITER_TABLE = f'[plugins."{CRI}".registry.configs."writer.example".auth]'

# The other writer: argv = config.toml config.json stop-file report-file.
WRITER = f"""
import base64, json, os, random, re, sys, time

toml_path, json_path, stop_path, report_path = sys.argv[1:5]
pause = float(sys.argv[5])  # the most it waits between generations (random); 0: a tight loop
rng = random.Random(1)
MARK = re.compile(r"WRITER-GEN-[0-9]+")
TABLE = {WRITER_TABLE!r}


def read(path):
    with open(path) as file:
        return file.read()


def write(path, text, generation):
    if generation % 2:
        temp = path + ".writer-tmp"
        with open(temp, "w") as file:
            file.write(text)
        os.rename(temp, path)
    else:
        with open(path, "w") as file:
            file.write(text)


def toml_with(text, mark):
    if TABLE not in text:  # the first time: add our login
        text += "\\n# the other writer's login\\n" + TABLE + "\\n"
        text += '  username = "writer"\\n  password = "WRITER-GEN-0"\\n'
    return MARK.sub(mark, text)


def json_with(text, mark):
    document = json.loads(text)
    auth = base64.b64encode(("writer:" + mark).encode()).decode()
    document["auths"]["writer.example"] = {{"auth": auth}}
    document["WriterGeneration"] = mark
    return json.dumps(document, indent=2) + "\\n"


def put_back_soon(path, previous):
    # The text once it holds `previous` again within 100 ms (the agent found it had
    # replaced our write and put ours back), else None.
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline:
        time.sleep(0.001)
        text = read(path)
        if previous in text:
            return text
    return None


generation, lost, put_back, unreadable = 0, [], [], 0
while not os.path.exists(stop_path):
    generation += 1
    mark = "WRITER-GEN-%d" % generation
    previous = "WRITER-GEN-%d" % (generation - 1)
    for path, edit in ((toml_path, toml_with), (json_path, json_with)):
        try:
            text = read(path)
            if generation > 1 and previous not in text:
                again = put_back_soon(path, previous)
                where = (os.path.basename(path), generation - 1)
                (put_back if again is not None else lost).append(where)
                text = text if again is None else again
            write(path, edit(text, mark), generation)
        except (OSError, ValueError):
            unreadable += 1  # the agent's file is always complete: this would be a finding
    if pause:
        time.sleep(rng.uniform(0, pause))
with open(report_path, "w") as file:
    report = {{"generations": generation, "lost": lost, "put_back": put_back}}
    json.dump(dict(report, unreadable=unreadable), file)
"""

RESTART_SCRIPT = """#!/bin/sh
date +%s.%N >> "$1"
"""

pytestmark = pytest.mark.usefixtures("leak_audit")


def writer_generation(text: str) -> int | None:
    """The newest generation marker of the other writer in `text`."""
    return max((int(found) for found in re.findall(r"WRITER-GEN-([0-9]+)", text)), default=None)


def foreign_kept(node: NodeTree, generation: int) -> list[str]:
    """What is wrong with the other writer's and the image's content (empty: nothing)."""
    problems = []
    toml = tomllib.loads(node.config_toml.read_text())
    configs = toml["plugins"][CRI]["registry"]["configs"]
    if configs.get("writer.example", {}).get("auth", {}).get("password") != (
        f"WRITER-GEN-{generation}"
    ):
        problems.append("config.toml: the other writer's last login is not there")
    expected_toml = tomllib.loads(FOREIGN_TOML)
    for key in ("root", "grpc"):
        if toml.get(key) != expected_toml[key]:
            problems.append(f"config.toml: {key} changed")
    expected_configs = expected_toml["plugins"][CRI]["registry"]["configs"]
    for host, table in expected_configs.items():
        if configs.get(host) != table:
            problems.append(f"config.toml: {host} changed")
    document = json.loads(node.config_json.read_text())
    if document.get("WriterGeneration") != f"WRITER-GEN-{generation}":
        problems.append("config.json: the other writer's last generation is not there")
    for key, entry in json.loads(FOREIGN_JSON)["auths"].items():
        if document["auths"].get(key) != entry:
            problems.append(f"config.json: {key} changed")
    if document.get("HttpHeaders") != json.loads(FOREIGN_JSON)["HttpHeaders"]:
        problems.append("config.json: HttpHeaders changed")
    return problems


#: How the other writer paces itself: not at all, or a random pause of up to 10 ms, which
#: leaves the agent gaps to write in (and so races it for real).
PACING = {"a tight loop": 0.0, "a write every few ms": 0.01}


@pytest.mark.parametrize("pacing", list(PACING))
def test_another_writer_loses_nothing_and_the_agent_does_not_fight(
    pacing: str,
    tmp_path: Path,
    kube_api: KubeApiServer,
    cri_socket: str,
    leak_audit: LeakAudit,
    record_property: Any,
) -> None:
    run_for = campaign_size(quick=3, full=60)
    node = NodeTree.create(tmp_path / "node")
    leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
    restart_log, script = tmp_path / "restarts.log", tmp_path / "restart.sh"
    script.write_text(RESTART_SCRIPT)
    writer_script, stop, report = tmp_path / "writer.py", tmp_path / "stop", tmp_path / "report"
    writer_script.write_text(WRITER)
    versions = SecretVersions(kube_api)
    versions.publish()
    argv = daemon_argv(
        node,
        kube_api,
        restart_command=f"/bin/sh {script} {restart_log}",
        cri_socket=Path(cri_socket),
        extra=["--min-reload-interval", f"{MIN_RELOAD_INTERVAL:g}s"],
    )
    agent = AgentProcess.start(argv, log=tmp_path / "agent.log")
    writer: subprocess.Popen[bytes] | None = None
    try:
        with campaign(record_property, CAMPAIGN, command=COMMAND) as tally:
            wait_until(
                lambda: agent.in_sync() and agent_passwords(node) == (versions.last,) * 2,
                timeout=20,
                what=lambda: f"first sync; log:\n{agent.log_text()[-2000:]}",
            )
            before = Snapshot.of(agent, restart_log)
            started = time.monotonic()
            writer = subprocess.Popen(
                [
                    sys.executable,
                    str(writer_script),
                    *map(str, node.targets),
                    str(stop),
                    str(report),
                    str(PACING[pacing]),
                ]
            )
            while time.monotonic() - started < run_for:  # the Secret changes meanwhile
                time.sleep(0.5)
                versions.publish()
            stop.touch()
            assert writer.wait(timeout=30) == 0
            elapsed = time.monotonic() - started
            written = json.loads(report.read_text())
            generation = written["generations"]
            wait_until(
                lambda: agent.in_sync() and agent_passwords(node) == (versions.last,) * 2,
                timeout=10,
                what=lambda: f"in sync after the writer stopped: {agent_passwords(node)}",
            )
            during = Snapshot.of(agent, restart_log) - before
            # The agent may still be working through a backlog of the other writer's events
            # (the kernel queues up to 16,384); then it must go idle by itself.
            idle_after = wait_until(
                lambda: (quiet := idle_second(agent, restart_log)).cpu < 0.05 and not quiet.passes,
                timeout=15,
                what="the agent idle once the other writer stopped",
            )

            figures = (
                f"{pacing}, {run_for} s: the other writer wrote {generation} generations of "
                f"both files, the Secret changed {len(versions.published) - 1} times; agent "
                f"CPU {during.cpu:.2f} s ({100 * during.cpu / elapsed:.0f} % of one core, "
                f"{1e6 * during.cpu / generation:.0f} us per generation), "
                f"{during.passes:.0f} passes ({during.errors:.0f} failed: the other writer "
                f"kept changing the file), {during.restarts} containerd restarts, "
                f"{during.repairs:.0f} drift repairs, {len(written['put_back'])} times the "
                "other writer's write was replaced for a moment and put back; idle "
                f"{idle_after:.1f} s after the writer stopped"
            )
            print(f"\nconcurrent writers: {figures}")
            tally.notes.append(figures)
            tally.cases += generation
            tally.outcomes["other writer's generations"] += generation
            tally.data_lost += len(written["lost"])
            tally.outcomes["other writer's write replaced, put back by the agent"] += len(
                written["put_back"]
            )
            assert written["lost"] == [], f"the agent overwrote the other writer: {written['lost']}"
            assert written["unreadable"] == 0
            assert writer_generation(node.config_toml.read_text()) == generation
            assert foreign_kept(node, generation) == []
            assert node.temp_files() == []
            # No fight. Restarts: at most one per --min-reload-interval. Passes: the debounce
            # (200 ms) batches the other writer's events, a few retries. CPU: what watching
            # the other writer costs (watchdog handles each of its inotify events, ~0.2-0.4 ms
            # a generation here), and nothing once it stops: a hot loop would not stop.
            assert during.restarts <= 1 + elapsed / MIN_RELOAD_INTERVAL
            assert during.passes <= 2 * elapsed / 0.2 + 10
            assert during.cpu <= 1.5e-3 * generation + 0.5, figures
            assert agent.stop() == 0
            assert "Traceback" not in agent.log_text()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        if agent.process.poll() is None:
            agent.stop()


def idle_second(agent: AgentProcess, restart_log: Path) -> Snapshot:
    """What the agent did in the next second."""
    before = Snapshot.of(agent, restart_log)
    time.sleep(1)
    return Snapshot.of(agent, restart_log) - before


@dataclass(frozen=True)
class Snapshot:
    """The agent's counters at one moment (or the difference of two)."""

    cpu: float
    passes: float
    errors: float
    repairs: float
    restarts: int

    @classmethod
    def of(cls, agent: AgentProcess, restart_log: Path) -> Snapshot:
        metrics = agent.metrics()

        def total(name: str, label: str, values: tuple[str, ...]) -> float:
            return sum(metrics.get((name, frozenset({(label, v)})), 0.0) for v in values)

        return cls(
            cpu=metrics[("process_cpu_seconds_total", frozenset())],
            passes=total("node_agent_reconcile_total", "result", ("applied", "noop", "error")),
            errors=total("node_agent_reconcile_total", "result", ("error",)),
            repairs=total("node_agent_drift_repairs_total", "target", ("containerd", "kubelet")),
            restarts=len(restart_log.read_text().split()) if restart_log.exists() else 0,
        )

    def __sub__(self, other: Snapshot) -> Snapshot:
        return Snapshot(
            self.cpu - other.cpu,
            self.passes - other.passes,
            self.errors - other.errors,
            self.repairs - other.repairs,
            self.restarts - other.restarts,
        )
