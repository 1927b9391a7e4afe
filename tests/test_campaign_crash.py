"""Crash consistency (RELIABILITY.md): `node-agent reconcile` SIGKILLed at every
step of a pass, and what the node looks like afterwards.

Each case copies a prepared node (one of the scenarios below), runs `node-agent reconcile`
as a child under `tests/kill_at.py`, which SIGKILLs it the Nth time it reaches one point
(before or after a temp file write, fsync, rename, unlink, state save, stale temp cleanup,
rollback, the restart command, the CRI health check), then checks:

* right after the kill: both node files parse and each is byte-for-byte the old file or a
  version an uninterrupted run writes; `owned.json` loads;
* after the next, uninterrupted run: it ends exactly as an uninterrupted run from the start
  would (same exit code, same bytes in both files, same state), no temp file is left, no
  foreign entry is lost, and "containerd" runs what is on disk (the recording restart
  command logs a checksum of config.toml at each restart; a restart pending from the killed
  run is honoured).

Kill points and occurrences come from a census: each scenario is first run uninterrupted
under the same hook, counting how often each point is reached. Cases are drawn at random
(seeded) so that every point reached by any scenario is killed at least once.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from campaign import campaign, campaign_seed, campaign_size, run_cli
from leak_audit import CANARY_PASSWORD, CANARY_USERNAME, LeakAudit
from support.agent import agent_process_env
from support.cri import fake_cri_socket
from support.node import (
    CRI,
    FOREIGN_JSON,
    FOREIGN_JSON_AUTHS,
    FOREIGN_TOML,
    FOREIGN_TOML_AUTHS,
    NodeTree,
)

from node_agent.ownership import AgentState, StateStore

KILL_AT = Path(__file__).with_name("kill_at.py")
REG = "reg.example:5000"
CANARY = {"username": CANARY_USERNAME, "password": CANARY_PASSWORD}
OLD_CANARY = {"username": CANARY_USERNAME, "password": "old-password-1"}
TAKE_OVER = {"docker.io": CANARY, "foreign.example": CANARY, "quay.io": CANARY}
# Like containerd: the restart fails while config.toml names broken.example. Each restart
# logs "OK|FAILED <sha256 of config.toml>"; the last OK line is what "containerd" runs.
RESTART_SCRIPT = """#!/bin/sh
if [ -e "$1" ]; then sum=$(sha256sum < "$1" | cut -c1-64); else sum=absent; fi
if [ -e "$1" ] && grep -q broken.example "$1"; then
  echo "FAILED $sum" >> "$2"
  echo "containerd: failed to load config" >&2
  exit 1
fi
echo "OK $sum" >> "$2"
"""

pytestmark = pytest.mark.usefixtures("leak_audit")


@dataclass(frozen=True)
class Scenario:
    """A node state before the killed run, and the Secret the killed run applies."""

    name: str
    secret: dict[str, dict[str, str]]
    reload: str = "command"
    setup_secret: dict[str, dict[str, str]] | None = None
    toml: str | None = FOREIGN_TOML
    json_text: str | None = FOREIGN_JSON
    restart_pending: bool = False
    symlinked_toml: bool = False

    @property
    def expected_exit(self) -> int:
        return 1 if "broken.example" in self.secret else 0


SCENARIOS = [
    Scenario("add", {REG: CANARY}),
    Scenario("add", {REG: CANARY}, reload="none"),
    Scenario("rotate", {REG: CANARY}, setup_secret={REG: OLD_CANARY}),
    Scenario("rotate", {REG: CANARY}, reload="none", setup_secret={REG: OLD_CANARY}),
    Scenario("remove", {"second.example": CANARY}, setup_secret={REG: CANARY}),
    Scenario("take over", TAKE_OVER),
    Scenario("give back", {}, setup_secret=TAKE_OVER),
    Scenario("give back", {}, reload="none", setup_secret=TAKE_OVER),
    Scenario("create files", {REG: CANARY}, toml=None, json_text=None),
    Scenario("rollback", {REG: CANARY, "broken.example": CANARY}),
    Scenario("pending restart", {REG: CANARY}, setup_secret={REG: CANARY}, restart_pending=True),
    Scenario("symlinked config.toml", {REG: CANARY}, symlinked_toml=True),
]


@dataclass(frozen=True)
class Census:
    """An uninterrupted run of a scenario: the points it reaches and where it ends."""

    counts: dict[str, int]
    renamed: dict[str, list[str]]
    exit_code: int
    final: dict[str, bytes | None]
    final_state: AgentState


@dataclass(frozen=True)
class Case:
    scenario: int
    point: str
    occurrence: int

    def describe(self, seed: int) -> str:
        scenario = SCENARIOS[self.scenario]
        return (
            f"[{scenario.name}, --reload {scenario.reload}] kill {self.point} "
            f"#{self.occurrence} (seed {seed})"
        )


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    data_lost: bool = False

    def lost(self, problem: str) -> None:
        self.problems.append(problem)
        self.data_lost = True


@pytest.fixture(scope="module")
def cri_socket() -> Iterator[str]:
    """One fake CRI for the whole module (the module's many kills share it)."""
    with fake_cri_socket(prefix="na-crash-") as socket_path:
        yield socket_path


class Campaign:
    """Templates, census and cases of one campaign run, all under `workdir`."""

    def __init__(self, workdir: Path, cri_socket: str, audit: LeakAudit) -> None:
        self.workdir = workdir
        self.cri_socket = cri_socket
        self.audit = audit
        self.guarded: dict[Path, Any] = {}
        self.restart_script = workdir / "restart.sh"
        self.restart_script.write_text(RESTART_SCRIPT)
        self.templates = [self._template(i, s) for i, s in enumerate(SCENARIOS)]
        self.censuses = [self._census(i) for i in range(len(SCENARIOS))]

    # --- a node in a scenario's start state ----------------------------------------------------

    def flags(self, node: NodeTree, reload: str) -> list[str]:
        if reload == "none":
            return node.flags("--reload", "none", "--log-level", "debug")
        restart = f"sh {self.restart_script} {node.config_toml} {node.root / 'restarts.log'}"
        return node.flags(
            "--reload",
            "command",
            "--reload-command",
            restart,
            "--containerd-socket",
            self.cri_socket,
            "--reload-timeout",
            "10s",
            "--log-level",
            "debug",
        )

    def _template(self, index: int, scenario: Scenario) -> Path:
        root = self.workdir / f"template-{index}"
        node = NodeTree.create(root, toml=scenario.toml, json_text=scenario.json_text)
        if scenario.symlinked_toml:
            real = root / "real/config.toml"
            real.parent.mkdir()
            node.config_toml.rename(real)
            node.config_toml.symlink_to(real)
        self.audit.allow(node.secret)
        self.audit.guard_node(files=node.targets, state_dir=node.state_dir)
        if scenario.setup_secret is not None:
            node.write_secret(scenario.setup_secret)
            assert run_cli(self.audit, ["reconcile", *self.flags(node, "none")]).code == 0
        running = _sha_or_absent(node.config_toml)
        if scenario.restart_pending:
            # Killed earlier between writing config.toml and restarting containerd, which
            # still runs the node image's config.
            state = StateStore(node.state_dir)
            state.save(AgentState(state.load().owned, containerd_restart_pending=True))
            running = hashlib.sha256(FOREIGN_TOML.encode()).hexdigest()
        (root / "restarts.log").write_text(f"OK {running}\n")
        node.write_secret(scenario.secret)
        return root

    def copy(self, index: int, name: str) -> NodeTree:
        root = self.workdir / name
        shutil.copytree(self.templates[index], root, symlinks=True)
        if SCENARIOS[index].symlinked_toml:
            link = root / "etc/containerd/config.toml"
            link.unlink()
            link.symlink_to(root / "real/config.toml")
        node = NodeTree(root)
        self.audit.allow(node.secret)
        self.guarded[root] = self.audit.guard_node(files=node.targets, state_dir=node.state_dir)
        return node

    def forget(self, node: NodeTree) -> None:
        """Check `node` for leaks now, then delete it."""
        self.audit.check_tree(node.root)
        self.audit.release(self.guarded.pop(node.root), node.secret)
        shutil.rmtree(node.root)

    # --- runs ---------------------------------------------------------------------------------

    def child(
        self, node: NodeTree, reload: str, mode: list[str]
    ) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            str(KILL_AT),
            *mode,
            "--",
            "reconcile",
            *self.flags(node, reload),
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=agent_process_env(),
        )
        self.audit.check_text(result.stdout + result.stderr, "killed child's output")
        return result

    def _census(self, index: int) -> Census:
        scenario = SCENARIOS[index]
        node = self.copy(index, f"census-{index}")
        out = self.workdir / f"census-{index}.json"
        result = self.child(node, scenario.reload, ["--census", str(out)])
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == scenario.expected_exit, result.stderr
        recorded = json.loads(out.read_text())
        census = Census(
            counts=recorded["counts"],
            renamed=recorded["renamed"],
            exit_code=result.returncode,
            final=node.contents(),
            final_state=StateStore(node.state_dir).load(),
        )
        verdict = Verdict()
        self.check_converged(node, scenario, verdict)
        assert not verdict.problems, f"uninterrupted run of {scenario.name}: {verdict.problems}"
        return census

    # --- checks -------------------------------------------------------------------------------

    def check_after_kill(self, node: NodeTree, case: Case, old: dict[str, bytes | None]) -> Verdict:
        verdict = Verdict()
        census = self.censuses[case.scenario]
        now = node.contents()
        for name, target in (("config.toml", node.config_toml), ("config.json", node.config_json)):
            allowed = {_sha(old[name])} | set(census.renamed.get(target.resolve().name, []))
            content = now[name]
            if _sha(content) not in allowed:
                verdict.lost(f"{name} is neither the old file nor a version a clean run writes")
            elif content is not None:
                _parses(name, content, verdict)
        try:
            StateStore(node.state_dir).load()
        except Exception as error:
            verdict.problems.append(f"owned.json does not load after the kill: {error}")
        return verdict

    def check_recovered(self, node: NodeTree, case: Case, verdict: Verdict) -> None:
        scenario, census = SCENARIOS[case.scenario], self.censuses[case.scenario]
        run = run_cli(self.audit, ["reconcile", *self.flags(node, scenario.reload)])
        if run.code != census.exit_code:
            verdict.problems.append(f"next run exited {run.code}, a clean run {census.exit_code}")
        now = node.contents()
        for name in ("config.toml", "config.json"):
            if now[name] != census.final[name]:
                verdict.problems.append(f"next run left {name} unlike a clean run")
        state = StateStore(node.state_dir).load()
        if state != census.final_state:
            verdict.problems.append("next run left a state unlike a clean run")
        self.check_converged(node, scenario, verdict)

    def check_converged(self, node: NodeTree, scenario: Scenario, verdict: Verdict) -> None:
        leftovers = node.temp_files()
        if leftovers:
            verdict.problems.append(f"temp files left: {[p.name for p in leftovers]}")
        _check_foreign_entries(node, scenario, verdict)
        if node.config_toml.is_symlink() != scenario.symlinked_toml:
            verdict.problems.append("config.toml symlink not kept")
        if scenario.reload == "command":
            running = _running_config(node.root / "restarts.log")
            if running != _sha_or_absent(node.config_toml):
                verdict.problems.append("containerd does not run the config.toml on disk")


def _check_foreign_entries(node: NodeTree, scenario: Scenario, verdict: Verdict) -> None:
    """Every foreign entry the Secret does not name holds its original value; nothing else in
    either file changed."""
    try:
        _check_foreign_toml(node, scenario, verdict)
        _check_foreign_json(node, scenario, verdict)
    except (OSError, ValueError, KeyError, TypeError) as error:  # unreadable or reshaped
        verdict.lost(f"a node file is broken: {type(error).__name__}: {error}")


def _check_foreign_toml(node: NodeTree, scenario: Scenario, verdict: Verdict) -> None:
    if scenario.toml is not None:
        data = tomllib.loads(node.config_toml.read_text())
        configs = data["plugins"][CRI]["registry"].pop("configs", {})
        for host, auth in FOREIGN_TOML_AUTHS.items():
            if host not in _containerd_keys(scenario.secret) and configs[host].get("auth") != auth:
                verdict.lost(f"config.toml lost the foreign entry {host}")
        if configs.get("tls-only.example") != {"tls": {"insecure_skip_verify": True}}:
            verdict.lost("config.toml lost the foreign tls table")
        original = tomllib.loads(FOREIGN_TOML)
        original["plugins"][CRI]["registry"].pop("configs")
        if data != original:
            verdict.lost("config.toml changed outside registry.configs")


def _check_foreign_json(node: NodeTree, scenario: Scenario, verdict: Verdict) -> None:
    if scenario.json_text is not None:
        document = json.loads(node.config_json.read_text())
        auths = document.pop("auths")
        for key, auth in FOREIGN_JSON_AUTHS.items():
            if key not in _kubelet_keys(scenario.secret) and auths.get(key) != auth:
                verdict.lost(f"config.json lost the foreign entry {key}")
        if document != {"HttpHeaders": {"User-Agent": "Docker-Client/24.0"}}:
            verdict.lost("config.json changed outside auths")


def _containerd_keys(secret: dict[str, Any]) -> set[str]:
    return {"registry-1.docker.io" if key == "docker.io" else key for key in secret}


def _kubelet_keys(secret: dict[str, Any]) -> set[str]:
    return {"https://index.docker.io/v1/" if key == "docker.io" else key for key in secret}


def _parses(name: str, content: bytes, verdict: Verdict) -> None:
    try:
        if name.endswith(".toml"):
            tomllib.loads(content.decode())
        else:
            json.loads(content)
    except ValueError:
        verdict.lost(f"{name} does not parse")


def _sha(content: bytes | None) -> str:
    return "absent" if content is None else hashlib.sha256(content).hexdigest()


def _sha_or_absent(path: Path) -> str:
    return _sha(path.read_bytes() if path.exists() else None)


def _running_config(log: Path) -> str | None:
    """The checksum of the config "containerd" runs; None when its last restart failed."""
    status, checksum = log.read_text().splitlines()[-1].split()
    return checksum if status == "OK" else None


def draw_cases(censuses: list[Census], count: int, rng: random.Random) -> list[Case]:
    """`count` cases; every point some scenario reaches is killed at least once (as long as
    `count` allows), the rest spread at random over scenarios, points and occurrences."""
    by_point: dict[str, list[tuple[int, int]]] = {}
    for index, census in enumerate(censuses):
        for point, times in census.counts.items():
            by_point.setdefault(point, []).extend((index, n) for n in range(1, times + 1))
    points = sorted(by_point)
    rng.shuffle(points)
    cases = []
    for i in range(count):
        point = points[i] if i < len(points) else rng.choice(sorted(by_point))
        scenario, occurrence = rng.choice(by_point[point])
        cases.append(Case(scenario, point, occurrence))
    return cases


def test_sigkill_at_any_step_leaves_old_or_new_files_and_the_next_run_converges(
    tmp_path: Path,
    cri_socket: str,
    leak_audit: LeakAudit,
    record_property: Any,
) -> None:
    seed = campaign_seed()
    kills = campaign_size(quick=60, full=1000)
    command = "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_crash.py"
    with campaign(record_property, "crash consistency (SIGKILL)", command=command) as tally:
        run = Campaign(tmp_path, cri_socket, leak_audit)
        cases = draw_cases(run.censuses, kills, random.Random(seed))
        points_killed: set[str] = set()
        failures: list[str] = []
        for number, case in enumerate(cases):
            node = run.copy(case.scenario, f"case-{number}")
            old = node.contents()
            killed = run.child(
                node, SCENARIOS[case.scenario].reload, ["--kill", f"{case.point}:{case.occurrence}"]
            )
            if killed.returncode != -9:
                failures.append(f"{case.describe(seed)}: not killed (exit {killed.returncode})")
                continue
            tally.cases += 1
            points_killed.add(case.point)
            verdict = run.check_after_kill(node, case, old)
            run.check_recovered(node, case, verdict)
            if verdict.problems:
                failures.append(f"{case.describe(seed)}: {'; '.join(verdict.problems)}")
                tally.failures += 1
                tally.data_lost += verdict.data_lost
                continue
            run.forget(node)
        reached = {point for census in run.censuses for point in census.counts}
        tally.notes.append(f"{len(points_killed)} kill points of {len(reached)} reached")
        assert not failures, f"{len(failures)} of {len(cases)} kills failed:\n" + "\n".join(
            failures[:30]
        )
        if kills >= len(reached):
            assert points_killed == reached
