"""The agent under test, seen from outside: `Agent` is `node-agent run` built in this process
(the real `kubernetes` client against tests/kubeapi.py), `AgentProcess` is the agent as a
child process. Both read metrics (`metric`, `passes`, `in_sync`) and wait for the daemon to
go quiet in the same way."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from kubeapi import KubeApiServer
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from node_agent.daemon.daemon import Daemon
from node_agent.daemon.run import build_daemon
from node_agent.settings import DaemonSettings
from support.node import NodeTree
from support.settings import Timings
from support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
TARGET_NAMES = ("containerd", "kubelet")
PASS_RESULTS = ("applied", "noop", "error")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Metric samples by (name, labels)."""


def samples(families: Iterable[Metric]) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
    }


def scrape(port: int) -> Samples:
    """The samples /metrics serves on 127.0.0.1:`port`; none while nothing answers there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    return samples(text_string_to_metric_families(text))


class _Metrics:
    """What both harnesses read from the agent's metrics."""

    def metrics(self) -> Samples:
        raise NotImplementedError

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value; 0 when it is absent."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def passes(self, result: str | None = None) -> float:
        """Passes so far with this result (applied, noop, error), or whatever their result."""
        results = PASS_RESULTS if result is None else (result,)
        metrics = self.metrics()
        return sum(
            metrics.get(("node_agent_reconcile_total", frozenset({("result", r)})), 0.0)
            for r in results
        )

    def in_sync(self) -> bool:
        metrics = self.metrics()
        return all(
            metrics.get(("node_agent_in_sync", frozenset({("target", t)})), 0.0) == 1
            for t in TARGET_NAMES
        )

    def wait_idle(self, *, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Until no pass ended for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last = self.passes()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            if (now := self.passes()) == last:
                return
            last = now
        raise AssertionError("the agent never went quiet")

    def wait_for_a_pass(self, *, timeout: float) -> None:
        """Until one more pass (of any result) has ended."""
        before = self.passes()
        wait_until(lambda: self.passes() > before, timeout=timeout, what="one more pass")


@dataclass
class Agent(_Metrics):
    """A daemon started in this process for `node`: metrics straight from its registry, its
    status server over HTTP, Events from the test API server."""

    daemon: Daemon
    node: NodeTree
    kube_api: KubeApiServer
    stopped: bool = False

    def metrics(self) -> Samples:
        return samples(self.daemon.parts.metrics.registry.collect())

    @property
    def port(self) -> int:
        """Where its status server listens on 127.0.0.1."""
        port = self.daemon.status_port
        assert port is not None, "the daemon serves no status"
        return port

    def scrape(self) -> Samples:
        """The samples its status server serves at /metrics."""
        return scrape(self.port)

    def get(self, path: str) -> tuple[int, str]:
        """Status and body of the status server's answer to GET `path`."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def events(self, reason: str) -> list[dict[str, Any]]:
        return self.kube_api.events("default", reason=reason)

    def wait_for_passwords(self, password: str | None, timeout: float = 3.0) -> float:
        """Until both node files hold `password` (None: no entry); the seconds it took."""
        return wait_until(
            lambda: self.node.passwords() == (password, password),
            timeout,
            lambda: f"both files hold {password!r}, they hold {self.node.passwords()}",
        )

    def stop(self, timeout: float = 4.0) -> None:
        """Stop the daemon (once); fails if it does not stop within `timeout`."""
        if not self.stopped:
            self.stopped = True
            assert self.daemon.stop(timeout=timeout), "the daemon did not stop in time"


StartAgent = Callable[..., Agent]
"""The `start_agent` fixture (tests/conftest.py): keyword arguments, an `Agent`."""


def start_in_process(
    settings: DaemonSettings, node: NodeTree, kube_api: KubeApiServer, timings: Timings
) -> Agent:
    """The daemon for `settings`, started; the caller stops it."""
    drop_closed_log_handlers()
    daemon = build_daemon(
        settings, watch_settings=timings.watch, timing=timings.worker, slot_timing=timings.slots
    )
    daemon.start()
    return Agent(daemon, node, kube_api)


@contextmanager
def running_in_process(
    settings: DaemonSettings, node: NodeTree, kube_api: KubeApiServer, timings: Timings
) -> Iterator[Agent]:
    """`start_in_process` for the block; stopped after it."""
    agent = start_in_process(settings, node, kube_api, timings)
    try:
        yield agent
    finally:
        agent.stop()


def drop_closed_log_handlers() -> None:
    """An earlier test that ran the CLI in this process (`configure_logging`) left a root
    handler writing to its own, since closed, captured stderr: every record of the daemon
    would then print a "Logging error" traceback, slowing it down by orders of magnitude."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            root.removeHandler(handler)


# --- the agent as a child process ------------------------------------------------------------


def agent_process_env() -> dict[str, str]:
    """The environment for a child agent: ours without NODE_AGENT_* settings."""
    return {key: value for key, value in os.environ.items() if not key.startswith("NODE_AGENT_")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class AgentProcess(_Metrics):
    """`node-agent run` as a child (optionally under a wrapper such as `capsh ... -c`), its
    output in a log file, its metrics scraped over HTTP."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, argv: Sequence[str], *, log: Path, wrapper: Sequence[str] = ()) -> Self:
        """`node-agent run ARGV --metrics-address 127.0.0.1:<a free port>`."""
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "node_agent",
            "run",
            *argv,
            "--metrics-address",
            f"127.0.0.1:{port}",
        ]
        if wrapper:
            command = [*wrapper, shlex.join(command)]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=agent_process_env(),
                cwd=REPO,
            )
        return cls(process, port, log)

    def metrics(self) -> Samples:
        return scrape(self.port)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM; the exit code (the child is killed if it does not end in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
