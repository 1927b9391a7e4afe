"""Fleet-safe restarts: how long a fleet takes to restart containerd through N
restart slots, against the rollout formula of docs/restart-slots.md,
ceil(nodes / N) x (restart + CRI health + settle).
Prints numbers; asserts nothing.

    python bench/restart_slots_bench.py [--nodes 50] [--concurrency 1 5] [--rounds 3]
        [--restart 0.2] [--settle 0.3] [--start-jitter 2.0] [--conflict-backoff 0.1]
        [--server-nagle] [--keep]

Every node is a full in-process daemon (`build_daemon`, the real `KubeApi` client, Secret
watch, Lease slots, file watches, status server, Events), all of them in one child process
(one interpreter, as 50 pods' worth of agent would not be, so this is a pessimistic CPU
setting); the test API server (tests/kubeapi.py) runs in this process, so the two share the
two cores but not a GIL. Each node has the demo node files; its "containerd restart" is a
shell script that sleeps `--restart` seconds and logs its start and end; the CRI health
check asks one shared fake CRI (tests/fake_cri.py). Slot timing is the shipped default
(`SlotTiming()`), except `--start-jitter` and `--conflict-backoff`.

A round: the Secret is created (first round) or updated, and the round ends when every node
has restarted once and every slot Lease is free again. Measured: Secret write → the last
slot release (both on this process's wall clock: the server's slot timeline is kept with
`time.time`, like the restart scripts' `date`). Reported per N, median over the rounds:
measured time, formula, ratio, where the overhead goes (first slot taken after the change;
slot hold beyond restart + settle, before and after the restart script; handover gap on a
slot, release → next acquire; restarts under the busiest slot), the most restarts seen
running at once (restart-script intervals) and slots held at once (server timeline; the
server's slot audit also checks max_holders = N), API requests per node in a round (server
request log), by resource and verb, and the fleet process's RSS and CPU.

The test API server's sockets get TCP_NODELAY here, like the real API server's (Go sets it
on every connection); `--server-nagle` keeps http.server's default, which adds a delayed
ACK (~40 ms) to most answers on a kept-alive connection.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):  # the test API server and the fake CRI
    if str(extra) not in sys.path:
        sys.path.append(str(extra))

import kubeapi  # noqa: E402
from kubeapi import KubeApiServer, SlotChange  # noqa: E402

SECRET_NS, SECRET_NAME = "kube-system", "registry-credentials"
LEASE_NS = "node-agent"
REGISTRY = "registry.bench.example:5000"
DOCKERCONFIG = "kubernetes.io/dockerconfigjson"
LEASE_TTL = 15.0
RELOAD_TIMEOUT = 5.0
MIN_RELOAD_INTERVAL = 1.0
SAMPLE = resources.files("node_agent.demo")

# The simulated containerd restart: ARGS NODE LOG SECONDS. One short append per line, so
# fifty nodes share the log.
RESTART_SCRIPT = """#!/bin/sh
echo "start $1 $(date +%s.%N)" >>"$2"
sleep "$3"
echo "end $1 $(date +%s.%N)" >>"$2"
"""


def dockerconfig(password: str) -> dict[str, bytes]:
    auths = {REGISTRY: {"username": "puller", "password": password}}
    return {".dockerconfigjson": json.dumps({"auths": auths}).encode()}


def node_name(index: int) -> str:
    return f"node-{index:03d}"


# --- the fleet: fifty daemons in one child process -----------------------------------------


def fleet_main(args: argparse.Namespace) -> None:
    """The child: start the daemons, say "ready" on stdout, stop them at stdin's EOF."""
    import logging

    from fake_cri import FakeCri

    from node_agent.containerd_restart import wait_for_cri
    from node_agent.daemon.run import build_daemon
    from node_agent.kube.model import ObjectRef
    from node_agent.restart_slots.coordinator import SlotTiming
    from node_agent.settings import DaemonSettings, RestartCoordination, Settings

    workdir = Path(args.workdir)
    logging.basicConfig(
        filename=workdir / "fleet.log",
        level=logging.INFO,
        format="%(asctime)s %(threadName)s %(name)s: %(message)s",
    )
    socket_dir = tempfile.mkdtemp(prefix="na-bench-cri-", dir="/tmp")
    socket_path = os.path.join(socket_dir, "cri.sock")
    cri = FakeCri(socket_path).start()
    health = _median_seconds(lambda: wait_for_cri(socket_path, timeout=5.0), rounds=20)
    script = workdir / "restart.sh"
    script.write_text(RESTART_SCRIPT)
    restarts = RestartCoordination(
        concurrency=args.concurrency,
        lease_ttl=LEASE_TTL,
        settle=args.settle,
        lease_namespace=LEASE_NS,
    )
    daemons = []
    started = time.monotonic()
    for index in range(args.nodes):
        name = node_name(index)
        root = workdir / "nodes" / name
        config_toml, config_json = _node_files(root)
        settings = DaemonSettings(
            node=Settings(
                containerd_config=config_toml,
                kubelet_config=config_json,
                state_dir=root / "var/lib/node-agent",
                restart_mode="command",
                restart_command=("/bin/sh", str(script), name, args.restart_log, str(args.restart)),
                restart_timeout=RELOAD_TIMEOUT,
                containerd_socket=Path(socket_path),
            ),
            secrets=(ObjectRef(SECRET_NS, SECRET_NAME),),
            kubeconfig=Path(args.kubeconfig),
            node_name=name,
            metrics_address="127.0.0.1:0",
            events=True,
            min_restart_interval=MIN_RELOAD_INTERVAL,
            restarts=restarts,
        )
        slot_timing = SlotTiming(
            start_jitter=args.start_jitter, conflict_backoff=args.conflict_backoff
        )
        daemon = build_daemon(settings, slot_timing=slot_timing)
        daemon.start()
        daemons.append(daemon)
    while not all(daemon.parts.health.readiness()[0] for daemon in daemons):
        time.sleep(0.1)
    ready = {"health": health, "start_seconds": time.monotonic() - started}
    print(json.dumps(ready), flush=True)
    sys.stdin.read()  # until the parent closes it
    stoppers = [threading.Thread(target=daemon.stop) for daemon in daemons]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()
    cri.stop()
    shutil.rmtree(socket_dir, ignore_errors=True)


def _node_files(root: Path) -> tuple[Path, Path]:
    config_toml = root / "etc/containerd/config.toml"
    config_json = root / "var/lib/kubelet/config.json"
    for path, sample in (
        (config_toml, "node/etc/containerd/config.toml"),
        (config_json, "node/var/lib/kubelet/config.json"),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(SAMPLE.joinpath(sample).read_bytes())
    return config_toml, config_json


def _median_seconds(action: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


@dataclass(frozen=True)
class Fleet:
    process: subprocess.Popen[str]
    health: float
    start_seconds: float

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
        return kib / 1024

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def fleet_process(
    api: KubeApiServer, args: argparse.Namespace, concurrency: int, workdir: Path
) -> Iterator[Fleet]:
    assert api.kubeconfig_path is not None
    command = [
        *(sys.executable, __file__, "--fleet-child", "--workdir", str(workdir)),
        *("--kubeconfig", str(api.kubeconfig_path), "--restart-log", str(restart_log(workdir))),
        *("--nodes", str(args.nodes), "--concurrency", str(concurrency)),
        *("--restart", str(args.restart), "--settle", str(args.settle)),
        *("--start-jitter", str(args.start_jitter)),
        *("--conflict-backoff", str(args.conflict_backoff)),
    ]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None and process.stdout is not None
    try:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fleet did not start; see {workdir / 'fleet.log'}")
        ready = json.loads(line)
        yield Fleet(process, ready["health"], ready["start_seconds"])
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- one round: a Secret change rolls through the fleet ------------------------------------


@dataclass(frozen=True)
class Restart:
    node: str
    start: float
    end: float


@dataclass(frozen=True)
class Hold:
    slot: str
    node: str
    start: float
    end: float


@dataclass(frozen=True)
class Round:
    measured: float
    first_taken: float
    """Secret write → the first slot taken."""
    holds: list[float]
    gaps: list[float]
    """On each slot: release → the next node's acquire."""
    restart_seconds: list[float]
    before_restart: list[float]
    """Slot taken → the restart script starts (the pass that writes config.toml)."""
    after_restart: list[float]
    """The restart script ends → the slot is released, minus the settle delay (CRI health,
    the pass's end, the slot thread's release)."""
    max_restarts: int
    max_holders: int
    most_on_one_slot: int
    """Restarts under the busiest slot (⌈nodes / N⌉ when the slots share the work evenly)."""
    requests: Counter[str]
    cpu_seconds: float


def restart_log(workdir: Path) -> Path:
    return workdir / "restarts.log"


def read_restarts(log: Path, since: float) -> list[Restart]:
    started: dict[str, float] = {}
    done: list[Restart] = []
    text = log.read_text() if log.exists() else ""
    lines = text.split("\n")[:-1]  # a line still being appended has no newline yet
    for event, node, at in (line.split() for line in lines):
        if event == "start":
            started[node] = float(at)
        elif node in started:
            done.append(Restart(node, started.pop(node), float(at)))
    return [restart for restart in done if restart.start >= since]


def slot_holds(timeline: list[SlotChange]) -> list[Hold]:
    current: dict[str, tuple[str, float]] = {}
    holds: list[Hold] = []
    for change in timeline:
        held = current.get(change.name)
        if held is not None and change.new_holder != held[0]:
            holds.append(Hold(change.name, held[0], held[1], change.at))
            del current[change.name]
        if change.name not in current and change.new_holder:
            current[change.name] = (change.new_holder, change.at)
    return holds


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def run_round(
    api: KubeApiServer,
    fleet: Fleet,
    workdir: Path,
    *,
    nodes: int,
    settle: float,
    password: str,
    first: bool,
) -> Round:
    time.sleep(MIN_RELOAD_INTERVAL)  # every node's restart gate is open again
    api.clear_requests()
    cpu_before = fleet.cpu_seconds()
    changed_at = time.time()
    if first:
        api.create_secret(SECRET_NS, SECRET_NAME, dockerconfig(password), type=DOCKERCONFIG)
    else:
        api.update_secret(SECRET_NS, SECRET_NAME, dockerconfig(password))
    deadline = time.monotonic() + 600
    while True:
        restarts = read_restarts(restart_log(workdir), changed_at)
        free = all(
            not (lease.get("spec") or {}).get("holderIdentity") for lease in api.leases(LEASE_NS)
        )
        if len(restarts) >= nodes and free:
            break
        if time.monotonic() > deadline or fleet.process.poll() is not None:
            raise RuntimeError(f"round not finished: {len(restarts)} of {nodes} restarted")
        time.sleep(0.05)
    time.sleep(0.5)  # late requests of this round (Events) land in the log
    cpu = fleet.cpu_seconds() - cpu_before
    holds = [h for h in slot_holds(api.slot_timeline(LEASE_NS)) if h.start >= changed_at]
    by_slot: dict[str, list[Hold]] = {}
    for hold in holds:
        by_slot.setdefault(hold.slot, []).append(hold)
    gaps = [
        later.start - earlier.end
        for slot_holds_ in by_slot.values()
        for earlier, later in itertools.pairwise(slot_holds_)
    ]
    record = {"changed_at": changed_at, "holds": holds, "restarts": restarts}
    (workdir / f"round-{password}.json").write_text(json.dumps(record, default=vars, indent=1))
    counts = Counter(r.node for r in restarts)
    assert set(counts.values()) == {1}, f"a node restarted more than once: {counts}"
    restart_of = {r.node: r for r in restarts}
    requests = Counter(f"{r.plural} {r.verb}" for r in api.requests())
    return Round(
        measured=max(h.end for h in holds) - changed_at,
        first_taken=min(h.start for h in holds) - changed_at,
        holds=[h.end - h.start for h in holds],
        gaps=gaps,
        restart_seconds=[r.end - r.start for r in restarts],
        before_restart=[restart_of[h.node].start - h.start for h in holds],
        after_restart=[h.end - restart_of[h.node].end - settle for h in holds],
        max_restarts=most_at_once([(r.start, r.end) for r in restarts]),
        max_holders=most_at_once([(h.start, h.end) for h in holds]),
        most_on_one_slot=max(len(slot_holds_) for slot_holds_ in by_slot.values()),
        requests=requests,
        cpu_seconds=cpu,
    )


# --- the report ---------------------------------------------------------------------------


def bench_concurrency(args: argparse.Namespace, concurrency: int) -> None:
    # The test server answers with two writes (headers, body); with Nagle's algorithm on its
    # sockets (http.server's default) the body waits for the client's delayed ACK of the
    # headers: ~40 ms per answer on a kept-alive connection. The real API server (Go) sets
    # TCP_NODELAY, so by default this bench does too; --server-nagle keeps the test default.
    kubeapi._Handler.disable_nagle_algorithm = not args.server_nagle
    workdir = Path(tempfile.mkdtemp(prefix=f"na-bench-slots-n{concurrency}-"))
    try:
        with (
            KubeApiServer(
                kubeconfig_path=workdir / "kubeconfig",
                bookmark_interval=60.0,  # like a real API server, not the tests' 5/s
                clock=time.time,
                max_holders=concurrency,
            ) as api,
            fleet_process(api, args, concurrency, workdir) as fleet,
        ):
            rss = fleet.rss_mib()
            rounds = [
                run_round(
                    api,
                    fleet,
                    workdir,
                    nodes=args.nodes,
                    settle=args.settle,
                    password=f"pw-{i}",
                    first=i == 0,
                )
                for i in range(args.rounds)
            ]
            violations = api.violations()
        report(args, concurrency, fleet, rss, rounds, violations)
    finally:
        if args.keep:
            print(f"  (files and fleet.log kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(
    args: argparse.Namespace,
    concurrency: int,
    fleet: Fleet,
    rss: float,
    rounds: list[Round],
    violations: list[str],
) -> None:
    batches = math.ceil(args.nodes / concurrency)
    per_batch = args.restart + fleet.health + args.settle
    formula = batches * per_batch
    measured = statistics.median(r.measured for r in rounds)
    median = statistics.median
    restart = median(s for r in rounds for s in r.restart_seconds)
    hold = median(median(r.holds) for r in rounds)
    gaps = [g for r in rounds for g in r.gaps] or [0.0]
    requests: Counter[str] = Counter()
    for r in rounds:
        requests.update(r.requests)
    per_node = {key: count / args.nodes / len(rounds) for key, count in requests.items()}
    print(f"N = {concurrency}: {args.nodes} nodes, {len(rounds)} rounds")
    print(f"  fleet: started in {fleet.start_seconds:.1f}s, RSS {rss:.0f} MiB after start")
    print(
        f"  measured (median): {measured:.2f}s  rounds: "
        + ", ".join(f"{r.measured:.2f}" for r in rounds)
    )
    print(
        f"  formula: {batches} x ({args.restart:g} + {fleet.health * 1000:.1f} ms + "
        f"{args.settle:g}) = {formula:.2f}s   ratio {measured / formula:.2f}"
    )
    print(
        f"  overhead: first slot taken {median(r.first_taken for r in rounds):.2f}s after the "
        f"change; slot hold {hold:.3f}s (restart script {restart:.3f}s + settle "
        f"{args.settle:g}s + {hold - restart - args.settle:.3f}s: before the script "
        f"{median(s for r in rounds for s in r.before_restart):.3f}s, after it "
        f"{median(s for r in rounds for s in r.after_restart):.3f}s); handover gap median "
        f"{median(gaps):.3f}s, mean {statistics.mean(gaps):.3f}s, max {max(gaps):.3f}s; "
        f"busiest slot {max(r.most_on_one_slot for r in rounds)} restarts ({batches} if even)"
    )
    print(
        f"  most restarts at once: {max(r.max_restarts for r in rounds)}, most slots held at "
        f"once: {max(r.max_holders for r in rounds)} (N = {concurrency}); audit violations: "
        f"{len(violations)}"
    )
    for violation in violations[:3]:
        print(f"    {violation}")
    total = sum(per_node.values())
    top = ", ".join(f"{key} {value:.1f}" for key, value in sorted(per_node.items()))
    print(f"  API requests per node per round: {total:.1f} ({top})")
    cpu = median(r.cpu_seconds / r.measured for r in rounds)
    print(f"  fleet CPU during a round: {cpu * 100:.0f} % of a core")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from node_agent.restart_slots.coordinator import SlotTiming

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--restart", type=float, default=0.2, help="seconds a restart takes")
    parser.add_argument("--settle", type=float, default=0.3, help="--restart-settle")
    parser.add_argument(
        "--start-jitter",
        type=float,
        default=SlotTiming().start_jitter,
        help="SlotTiming.start_jitter",
    )
    parser.add_argument(
        "--conflict-backoff",
        type=float,
        default=SlotTiming().conflict_backoff,
        help="SlotTiming.conflict_backoff",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the node files, fleet.log and round-*.json"
    )
    parser.add_argument(
        "--server-nagle",
        action="store_true",
        help="leave Nagle's algorithm on the test API server's sockets (its default)",
    )
    parser.add_argument("--fleet-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    parser.add_argument("--restart-log", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.fleet_child:
        args.concurrency = args.concurrency[0]
        fleet_main(args)
        return
    print(
        f"restart R = {args.restart:g}s, settle S = {args.settle:g}s, start jitter "
        f"{args.start_jitter:g}s, conflict backoff {args.conflict_backoff:g}s, "
        f"lease TTL {LEASE_TTL:g}s; "
        "formula ceil(nodes/N) x (R + health + S)"
    )
    for concurrency in args.concurrency:
        bench_concurrency(args, concurrency)


if __name__ == "__main__":
    main()
