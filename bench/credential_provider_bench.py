"""The credential-provider target's figures (BENCHMARKS.md). Prints numbers; asserts nothing.

    python bench/credential_provider_bench.py [--full]

1. one plugin invocation, as the kubelet makes it (the script run by its path, a request on
   stdin, an empty environment), p50 / p99 over 300 runs (1,000 with --full); for scale, the
   same spawn of /bin/true.
2. Secret update (timestamped just before the API write) → the plugin's next answer holds
   the new password: the daemon as its own process (`python -m node_agent run --targets
   credential-provider`, a restart command that counts restarts) against the test API server;
   this process asks the plugin again and again until it answers the new password. p50 / p99
   / max over 40 updates 0.3 s apart (200 with --full). The containerd restarts counted: the
   restart command's log and `node_agent_containerd_restarts_total`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from daemon_bench import (
    DOCKERCONFIG,
    NAME,
    NS,
    REGISTRY,
    daemon_process,
    dockerconfig,
    metrics,
    percentile,
    wait_for,
)
from kubeapi import KubeApiServer  # the test API server (daemon_bench puts tests/ on the path)

from node_agent.credentials import RegistryAuth
from node_agent.targets.credential_provider import (
    PLUGIN_NAME,
    PLUGIN_SCRIPT,
    RESPONSE_NAME,
    ResponseFormat,
)

REQUEST = json.dumps(
    {
        "kind": "CredentialProviderRequest",
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "image": f"{REGISTRY}/team/app:1",
    },
    separators=(",", ":"),
).encode()


def ask(plugin: Path) -> bytes:
    return subprocess.run(
        [str(plugin)], input=REQUEST, capture_output=True, env={}, check=False
    ).stdout


def spawn_ms(argv: list[str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, input=REQUEST, capture_output=True, env={}, check=False)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def bench_invocation(workdir: Path, runs: int) -> tuple[list[float], list[float]]:
    bin_dir = workdir / "invocation"
    bin_dir.mkdir()
    plugin = bin_dir / PLUGIN_NAME
    plugin.write_text(PLUGIN_SCRIPT)
    plugin.chmod(0o755)
    response = ResponseFormat()
    credentials = {REGISTRY: RegistryAuth("puller", "pw")}
    text = response.render(None, response.desired_entries(credentials, {}).entries)
    (bin_dir / RESPONSE_NAME).write_text(text)
    assert json.loads(ask(plugin))["auth"][REGISTRY]["password"] == "pw"
    return spawn_ms([str(plugin)], runs), spawn_ms(["/bin/true"], runs)


class ProviderNode:
    """A node with only the credential provider's directory, for `daemon_process`."""

    def __init__(self, root: Path) -> None:
        self.bin_dir = root / "image-credential-provider"
        self.bin_dir.mkdir(parents=True)
        self.state_dir = root / "state"
        self.restart_log = root / "restarts.log"

    def flags(self) -> list[str]:
        restart = f"sh -c 'echo restarted >> {self.restart_log}'"
        return [
            "--targets",
            "credential-provider",
            "--credential-provider-bin-dir",
            str(self.bin_dir),
            "--credential-provider-config",
            str(self.bin_dir / "config.yaml"),
            "--state-dir",
            str(self.state_dir),
            "--reload",
            "command",
            "--reload-command",
            restart,
        ]

    def answered_password(self) -> str | None:
        plugin = self.bin_dir / PLUGIN_NAME
        if not plugin.exists():
            return None
        try:
            password: str = json.loads(ask(plugin))["auth"][REGISTRY]["password"]
        except (ValueError, KeyError):
            return None
        return password


def bench_rotation(workdir: Path, updates: int) -> tuple[list[float], int, float]:
    """(latencies in ms, restarts the command logged, restarts the metrics counted)."""
    node = ProviderNode(workdir / "rotation")
    samples: list[float] = []
    with KubeApiServer(kubeconfig_path=workdir / "kubeconfig") as api:
        api.create_secret(NS, NAME, dockerconfig("start"), type=DOCKERCONFIG)
        with daemon_process(node, api, log=workdir / "rotation.log") as (_, port):  # type: ignore[arg-type]
            wait_for(lambda: node.answered_password() == "start", timeout=10)
            for round_ in range(updates):
                time.sleep(0.3)
                password = f"rotated-{round_}"
                started = time.perf_counter()
                api.update_secret(NS, NAME, dockerconfig(password))
                deadline = started + 5
                while node.answered_password() != password:
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"update {round_} not answered within 5 s")
                samples.append((time.perf_counter() - started) * 1000)
            text = metrics(port) or ""
    counted = sum(
        float(v)
        for v in re.findall(r"^node_agent_containerd_restarts_total\{[^}]*\} (\S+)$", text, re.M)
    )
    logged = len(node.restart_log.read_text().split()) if node.restart_log.exists() else 0
    return samples, logged, counted


def summary(samples: list[float]) -> str:
    return (
        f"p50 {statistics.median(samples):.1f} ms, p99 {percentile(samples, 0.99):.1f} ms, "
        f"max {max(samples):.1f} ms (n={len(samples)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="node-agent-provider-bench-"))
    plugin, true = bench_invocation(workdir, 1000 if args.full else 300)
    print(f"plugin invocation: {summary(plugin)}")
    print(f"/bin/true spawn, for scale: {summary(true)}")
    print(f"ratio of medians: {statistics.median(plugin) / statistics.median(true):.1f}x")
    latencies, logged, counted = bench_rotation(workdir, 200 if args.full else 40)
    print(f"Secret update -> plugin's next answer has the new password: {summary(latencies)}")
    print(f"containerd restarts: {logged} run by the restart command, {counted:g} counted")


if __name__ == "__main__":
    main()
