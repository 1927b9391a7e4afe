"""The status server under attack (RELIABILITY.md): `node-agent run` as a child process, its
`--metrics-address` on 127.0.0.1, attacked the way a security review did from the pod
network:

- slow clients: many connections that send half a request line and then nothing;
- huge headers: connections sending 99 headers of 65 KB each, as fast as they can;
- a mass close: every attacking connection closed at once.

While each attack runs, `/healthz` is asked again and again, as the kubelet's liveness probe
would. Invariants: the agent's RSS grows by less than 10 MB over the whole campaign, its
thread count does not grow, `/healthz` answers every time and its p99 stays under 100 ms.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from campaign import Tally, campaign, campaign_size, is_full_scale
from support.agent import AgentProcess
from support.dockerconfig import docker_config, login

CAMPAIGN = "status server under attack"
COMMAND = "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_status_server.py"
RSS_GROWTH_LIMIT_MB = 10.0
P99_LIMIT_MS = 100.0
HEADER = b"X-Filler: " + b"a" * 65_000 + b"\r\n"


@dataclass
class ProbedAgent(AgentProcess):
    """The agent as a child process, its RSS and threads sampled, `/healthz` timed."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    """(RSS in MB, threads), one per `sample()`."""

    def status(self) -> dict[str, str]:
        lines = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        return dict(line.split(":\t", 1) for line in lines if ":\t" in line)

    def sample(self) -> tuple[float, int]:
        status = self.status()
        measured = (int(status["VmRSS"].split()[0]) / 1024, int(status["Threads"]))
        self.samples.append(measured)
        return measured

    def healthz_ms(self) -> float:
        """One probe, connect to last byte; fails the campaign if it is not answered ok."""
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=3) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        elapsed = (time.perf_counter() - started) * 1000
        assert reply.startswith(b"HTTP/1.0 200 "), reply[:80]
        return elapsed


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[ProbedAgent]:
    secret = tmp_path / "secret.json"
    secret.write_bytes(docker_config({"reg.example": login("p", username="u")}))
    node = tmp_path / "node"
    for directory in ("etc/containerd", "var/lib/kubelet"):
        (node / directory).mkdir(parents=True)
    argv = [
        "--secret-file", str(secret), "--host-root", str(node), "--reload", "none",
        "--log-level", "warning",
    ]  # fmt: skip
    running = ProbedAgent.start(argv, log=tmp_path / "agent.log")
    deadline = time.monotonic() + 20
    while True:
        with suppress(OSError, AssertionError):
            running.healthz_ms()
            break
        assert running.process.poll() is None, running.log_text()
        assert time.monotonic() < deadline, "the agent never answered /healthz"
        time.sleep(0.1)
    yield running
    running.stop()


@contextmanager
def many_fds(count: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, count + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_slow_clients(port: int, count: int) -> list[socket.socket]:
    """`count` connections that send half a request line and then nothing."""
    clients = []
    for _ in range(count):
        with suppress(OSError):  # the server may push the oldest out while we connect
            conn = socket.create_connection(("127.0.0.1", port), timeout=2)
            with suppress(OSError):
                conn.sendall(b"GET /healthz HTT")
            clients.append(conn)
    return clients


def send_huge_headers(port: int, connections: int, headers: int) -> list[socket.socket]:
    """Connections that each try to send `headers` headers of 65 KB; they stay open."""
    clients = []
    for _ in range(connections):
        with suppress(OSError):
            conn = socket.create_connection(("127.0.0.1", port), timeout=0.5)
            clients.append(conn)
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")
            for _ in range(headers):
                conn.sendall(HEADER)  # refused (431) after 8 KiB: this raises soon
    return clients


def probe_while(agent: ProbedAgent, rounds: int, latencies: list[float]) -> None:
    for _ in range(rounds):
        latencies.append(agent.healthz_ms())
        agent.sample()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def record(
    tally: Tally, name: str, latencies: list[float], agent: ProbedAgent, before: float
) -> None:
    peak_rss = max(rss for rss, _ in agent.samples)
    tally.notes.append(
        f"{name}: /healthz p50 {statistics.median(latencies):.1f} ms, p99 "
        f"{p99(latencies):.1f} ms over {len(latencies)} probes; RSS {before:.1f} MB → peak "
        f"{peak_rss:.1f} MB; threads max {max(t for _, t in agent.samples)}"
    )


def test_slow_clients_huge_headers_and_a_mass_close_leave_the_agent_flat(
    agent: ProbedAgent, record_property: Any
) -> None:
    slow = campaign_size(quick=300, full=6000)
    header_clients = campaign_size(quick=10, full=40)
    headers_each = 99 if is_full_scale() else 20
    probes = campaign_size(quick=60, full=300)
    with campaign(record_property, CAMPAIGN, command=COMMAND) as tally, many_fds(slow + 64):
        rss_before, threads_before = agent.sample()
        latencies: dict[str, list[float]] = {"slow": [], "headers": [], "close": []}

        clients = open_slow_clients(agent.port, slow)
        probe_while(agent, probes, latencies["slow"])
        record(tally, f"{slow} slow clients", latencies["slow"], agent, rss_before)

        clients += send_huge_headers(agent.port, header_clients, headers_each)
        probe_while(agent, probes, latencies["headers"])
        name = f"{header_clients}x{headers_each} 65 KB headers"
        record(tally, name, latencies["headers"], agent, rss_before)

        for conn in clients:
            conn.close()
        probe_while(agent, probes, latencies["close"])
        record(tally, f"{len(clients)} closed at once", latencies["close"], agent, rss_before)

        tally.cases = slow + header_clients + 3 * probes
        peak_rss = max(rss for rss, _ in agent.samples)
        assert peak_rss - rss_before < RSS_GROWTH_LIMIT_MB, tally.notes
        assert max(threads for _, threads in agent.samples) == threads_before, tally.notes
        for name, measured in latencies.items():
            assert p99(measured) < P99_LIMIT_MS, (name, tally.notes)
        assert os.path.exists(f"/proc/{agent.process.pid}")
