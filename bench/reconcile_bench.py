"""Reconcile timings on realistic containerd configs (`bench/containerd-config-150.toml`, ~160
lines, and the demo's full `containerd config default` output, ~250 lines) with 1 and with 500
registries. Prints medians; no assertions.

    python bench/reconcile_bench.py [--rounds N]

Cases per registry count:
- apply: both files move to a new password (render + two fsync'd atomic writes + state);
- no-op: everything already in sync (read, parse, plan; nothing written);
- render only: the pure containerd render of the changed entries (no I/O).
"""

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from node_agent.credentials import Credentials, RegistryAuth
from node_agent.ownership import StateStore
from node_agent.plan import plan_target
from node_agent.reconcile import NodeFile, Reconciler
from node_agent.targets.containerd import ContainerdFormat, ParsedTexts
from node_agent.targets.kubelet import KubeletFormat

SAMPLE = resources.files("node_agent.demo")


def credentials(count: int, password: str) -> Credentials:
    return {
        f"registry-{i}.example.com:5000": RegistryAuth(f"user-{i}", password) for i in range(count)
    }


CONFIGS = {
    "bench/containerd-config-150.toml": Path(__file__).with_name("containerd-config-150.toml"),
    "demo config.toml": Path(str(SAMPLE.joinpath("node/etc/containerd/config.toml"))),
}


def fresh_node(root: Path, config: Path) -> Reconciler:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "config.toml").write_bytes(config.read_bytes())
    (root / "config.json").write_bytes(
        SAMPLE.joinpath("node/var/lib/kubelet/config.json").read_bytes()
    )
    files = [
        # With a memo, as the agent's wiring builds it.
        NodeFile(
            ContainerdFormat(memo=ParsedTexts()), root / "config.toml", restarts_containerd=True
        ),
        NodeFile(KubeletFormat(), root / "config.json"),
    ]
    return Reconciler(files, StateStore(root / "state"))


def median_ms(
    action: Callable[[], object], rounds: int, before: Callable[[], object] = lambda: None
) -> float:
    samples = []
    for _ in range(rounds):
        before()
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def bench(config: Path, count: int, rounds: int, workdir: Path) -> dict[str, float]:
    reconciler = fresh_node(workdir / f"node-{count}", config)
    passwords = iter(f"pw-{n}" for n in range(10**9))
    reconciler.reconcile(credentials(count, next(passwords)))
    apply = median_ms(lambda: reconciler.reconcile(credentials(count, next(passwords))), rounds)
    steady = credentials(count, "steady")
    reconciler.reconcile(steady)
    noop = median_ms(lambda: reconciler.reconcile(steady), rounds)

    containerd = ContainerdFormat(memo=ParsedTexts())
    text = (workdir / f"node-{count}/config.toml").read_text()
    wanted = containerd.desired_entries(credentials(count, "rotated"), {}).entries
    plan = plan_target(current=containerd.entries(text), desired=wanted, owned={})
    render = median_ms(lambda: containerd.render(text, plan.updates), rounds)
    return {"apply": apply, "noop": noop, "render": render, "lines": float(text.count("\n"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="node-agent-bench-"))
    try:
        header = ("registries", "apply ms", "no-op ms", "render ms")
        for label, config in CONFIGS.items():
            lines = config.read_text().count("\n")
            print(f"{label}: {lines} lines; medians of {args.rounds} rounds")
            print(" ".join(f"{name:>10}" for name in header) + f" {'lines after':>12}")
            for count in (1, 500):
                result = bench(config, count, args.rounds, workdir)
                print(
                    f"{count:>10} {result['apply']:>10.2f} {result['noop']:>10.2f}"
                    f" {result['render']:>10.2f} {int(result['lines']):>12}"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
