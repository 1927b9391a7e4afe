"""Crash consistency of the credential provider (RELIABILITY.md): `node-agent reconcile
--targets credential-provider` SIGKILLed at every step of a pass (tests/kill_at.py).

Right after the kill, what the kubelet would meet on the node: each of the three files is
byte-for-byte the old one or a version an uninterrupted run writes; the plugin, if there,
answers with a whole response of the old or the new credentials (or, on a first install
cut short before the response exists, fails with one line); the CredentialProviderConfig,
if there, is one the kubelet starts with, and the node image's provider keeps its bytes.
After the next, uninterrupted run: the same files and state as an uninterrupted run from the
start, and no temp file left.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaign import campaign, campaign_seed, campaign_size
from support.agent import agent_process_env
from support.kubelet_credential_provider import (
    NODE_IMAGE_CONFIG,
    config_errors,
    request,
    response_errors,
    run_plugin,
)

from node_agent.cli import main
from node_agent.ownership import AgentState, StateStore
from node_agent.targets.credential_provider import PLUGIN_NAME, RESPONSE_NAME

KILL_AT = Path(__file__).with_name("kill_at.py")
BIN_DIR = "etc/kubernetes/image-credential-provider"
FILES = (RESPONSE_NAME, PLUGIN_NAME, "config.yaml")
REGISTRY = "r.example.com"
V1 = "credentialprovider.kubelet.k8s.io/v1"


@dataclass(frozen=True)
class Scenario:
    name: str
    passwords: dict[str, str]
    """The registries and passwords of the killed run's Secret."""
    setup: dict[str, str] | None = None
    """What an earlier, uninterrupted run applied (None: a first install)."""


SCENARIOS = [
    Scenario("first install beside the node image's provider", {REGISTRY: "pw-new"}),
    Scenario("rotation", {REGISTRY: "pw-new"}, setup={REGISTRY: "pw-old"}),
    Scenario("new registry", {REGISTRY: "pw-new", "b.example": "b"}, setup={REGISTRY: "pw-old"}),
]


@dataclass(frozen=True)
class Census:
    counts: dict[str, int]
    renamed: dict[str, list[str]]
    final: dict[str, bytes | None]
    final_state: AgentState


class Node:
    """One copy of a scenario's node: the kubelet's plugin directory under a host root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin_dir = root / "host" / BIN_DIR

    def argv(self, passwords: dict[str, str]) -> list[str]:
        auths = {r: {"username": "puller", "password": p} for r, p in passwords.items()}
        secret = self.root / f"secret-{hashlib.sha256(repr(auths).encode()).hexdigest()[:8]}"
        secret.write_text(json.dumps({"auths": auths}))
        host = str(self.root / "host")
        return ["reconcile", "--secret-file", str(secret), "--host-root", host]

    def flags(self) -> list[str]:
        return ["--reload", "none", "--targets", "credential-provider"]

    def contents(self) -> dict[str, bytes | None]:
        return {name: _read(self.bin_dir / name) for name in FILES}

    def state(self) -> AgentState:
        return StateStore(self.root / "host/var/lib/node-agent").load()

    def temp_files(self) -> list[str]:
        return [p.name for p in self.bin_dir.iterdir() if p.name not in FILES]


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _sha(content: bytes | None) -> str:
    return "absent" if content is None else hashlib.sha256(content).hexdigest()


def template(workdir: Path, index: int, scenario: Scenario) -> Path:
    node = Node(workdir / f"template-{index}")
    node.bin_dir.mkdir(parents=True)
    (node.bin_dir / "config.yaml").write_text(NODE_IMAGE_CONFIG)
    if scenario.setup is not None:
        assert main([*node.argv(scenario.setup), *node.flags()], environ={}) == 0
    return node.root


def kill_child(node: Node, scenario: Scenario, mode: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(KILL_AT), *mode, "--", *node.argv(scenario.passwords)]
    return subprocess.run(
        [*command, *node.flags()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=agent_process_env(),
    )


def census_of(workdir: Path, index: int, scenario: Scenario) -> Census:
    node = Node(workdir / f"census-{index}")
    shutil.copytree(workdir / f"template-{index}", node.root, symlinks=True)
    out = workdir / f"census-{index}.json"
    result = kill_child(node, scenario, ["--census", str(out)])
    assert result.returncode == 0, result.stderr
    recorded = json.loads(out.read_text())
    return Census(recorded["counts"], recorded["renamed"], node.contents(), node.state())


def after_kill_problems(
    node: Node, scenario: Scenario, census: Census, old: dict[str, bytes | None]
) -> list[str]:
    problems: list[str] = []
    now = node.contents()
    for name in FILES:
        if _sha(now[name]) not in {_sha(old[name]), *census.renamed.get(name, [])}:
            problems.append(f"{name} is neither the old file nor a version a clean run writes")
    if now["config.yaml"] is not None:
        config = now["config.yaml"].decode()
        problems += [f"config.yaml: the kubelet refuses it: {e}" for e in config_errors(config)]
        if not config.startswith(NODE_IMAGE_CONFIG):
            problems.append("config.yaml: the node image's provider lost bytes")
    if now[PLUGIN_NAME] is not None:
        problems += plugin_problems(node, scenario)
    return problems


def plugin_problems(node: Node, scenario: Scenario) -> list[str]:
    answer = run_plugin(node.bin_dir / PLUGIN_NAME, request(f"{REGISTRY}/app:1"))
    if answer.returncode != 0:
        if (node.bin_dir / RESPONSE_NAME).exists() or answer.stderr.count(b"\n") != 1:
            return [f"the plugin failed: {answer.stderr!r}"]
        return []  # a first install cut short before the response: one line, no answer
    errors = response_errors(answer.stdout, api_version=V1)
    if errors:
        return [f"the plugin's answer: {errors}"]
    password = json.loads(answer.stdout)["auth"].get(REGISTRY, {}).get("password")
    allowed = {scenario.passwords[REGISTRY], (scenario.setup or {}).get(REGISTRY)}
    return [] if password in allowed else ["the plugin answers neither old nor new"]


def recovery_problems(node: Node, scenario: Scenario, census: Census) -> list[str]:
    if main([*node.argv(scenario.passwords), *node.flags()], environ={}) != 0:
        return ["the next run failed"]
    problems = [
        f"next run left {n} unlike a clean run"
        for n in FILES
        if node.contents()[n] != census.final[n]
    ]
    if node.state() != census.final_state:
        problems.append("next run left a state unlike a clean run")
    if node.temp_files():
        problems.append(f"temp files left: {node.temp_files()}")
    return problems


def test_sigkill_at_any_step_leaves_what_the_kubelet_can_use_and_the_next_run_converges(
    tmp_path: Path, record_property: Any
) -> None:
    seed = campaign_seed()
    command = (
        "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_crash_credential_provider.py"
    )
    name = "crash consistency (SIGKILL), credential provider"
    with campaign(record_property, name, command=command) as tally:
        for index, scenario in enumerate(SCENARIOS):
            template(tmp_path, index, scenario)
        censuses = [census_of(tmp_path, i, s) for i, s in enumerate(SCENARIOS)]
        cases = draw(censuses, random.Random(seed), campaign_size(quick=24, full=10_000))
        failures: list[str] = []
        for number, (index, point, occurrence) in enumerate(cases):
            scenario = SCENARIOS[index]
            node = Node(tmp_path / f"case-{number}")
            shutil.copytree(tmp_path / f"template-{index}", node.root, symlinks=True)
            old = node.contents()
            where = f"[{scenario.name}] kill {point} #{occurrence} (seed {seed})"
            killed = kill_child(node, scenario, ["--kill", f"{point}:{occurrence}"])
            if killed.returncode != -9:
                failures.append(f"{where}: not killed (exit {killed.returncode})")
                continue
            tally.cases += 1
            problems = after_kill_problems(node, scenario, censuses[index], old)
            problems += recovery_problems(node, scenario, censuses[index])
            if problems:
                tally.failures += 1
                failures.append(f"{where}: {'; '.join(problems)}")
            else:
                shutil.rmtree(node.root)
        tally.notes.append(f"{len(cases)} kills over {len(SCENARIOS)} scenarios")
        assert not failures, "\n".join(failures[:20])


def draw(censuses: list[Census], rng: random.Random, count: int) -> list[tuple[int, str, int]]:
    """Every point each scenario reaches, killed once at a random occurrence; then more at
    random up to `count` (every occurrence of every point at full scale)."""
    every = [
        (index, point, n)
        for index, census in enumerate(censuses)
        for point, times in sorted(census.counts.items())
        for n in range(1, times + 1)
    ]
    if count >= len(every):
        return every
    cases = [
        (index, point, rng.randint(1, times))
        for index, census in enumerate(censuses)
        for point, times in sorted(census.counts.items())
    ]
    rest = [case for case in every if case not in cases]
    return cases + rng.sample(rest, max(0, min(len(rest), count - len(cases))))
