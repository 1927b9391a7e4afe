"""Fixtures shared by the test modules. Append new fixtures; keep existing ones intact."""

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from campaign import CAMPAIGN_PROPERTY, campaign_table
from kubeapi import KubeApiServer
from leak_audit import LeakAudit, start_audit
from support.agent import Agent, StartAgent, start_in_process
from support.clock import ManualClock
from support.cri import fake_cri_socket
from support.node import MINIMAL_FOREIGN_JSON, MINIMAL_FOREIGN_TOML, NodeTree
from support.settings import (
    RESTART_SCRIPT,
    SECRET,
    agent_settings,
    fast_timings,
    restart_script_command,
)

from node_agent.kube.client import KubeApi
from node_agent.kube.model import ObjectRef
from node_agent.settings import DEFAULT_TARGETS


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[KubeApiServer]:
    """A test Kubernetes API server on 127.0.0.1 (tests/kubeapi.py), with short bookmarks.

    `kube_api.kubeconfig_path` points the real `kubernetes` client at it. The test fails if
    the server itself hit an unexpected error, or if the restart-slot audit recorded a
    violation the test did not clear (`kube_api.violations()`, `clear_violations()`).
    """
    with KubeApiServer(kubeconfig_path=tmp_path / "kubeconfig", bookmark_interval=0.1) as server:
        yield server
    assert server.unexpected_errors == []
    assert server.violations() == [], "restart-slot audit: Leases were used unsafely"


@pytest.fixture
def agent_api(kube_api: KubeApiServer) -> Iterator[KubeApi]:
    """The agent's own Kubernetes client (`node_agent.kube.client.KubeApi`, the real
    `kubernetes` client underneath) connected to `kube_api`, closed at teardown."""
    assert kube_api.kubeconfig_path is not None
    api = KubeApi.connect(kubeconfig=kube_api.kubeconfig_path, environ={})
    yield api
    api.close()


@pytest.fixture
def clock() -> ManualClock:
    """A monotonic clock the test moves by hand."""
    return ManualClock()


@pytest.fixture
def leak_audit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeakAudit]:
    """The credential leak audit (tests/leak_audit.py). Feed the agent the canary credential
    (`CANARY_USERNAME` / `CANARY_PASSWORD`), declare where it may be (`allow` for sources,
    `guard_node` for node files and the state dir), read output through `read_output()`.

    At teardown the test fails if the canary is found in a log record, stdout/stderr, an
    error message, a metrics registry, an Event or any other file under tmp_path, or if a
    node file holding it, the state dir or `owned.json` is not private. Campaign modules make
    it autouse; any module can request it.
    """
    audit = start_audit(request, tmp_path)
    yield audit
    audit.finish()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The campaign figures (RELIABILITY.md) of the tests that recorded them with
    `record_campaign`, as a table at the end of the run."""
    # Figures recorded by a fixture reach only the teardown report: take each test's last.
    by_test: dict[str, list[Any]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            recorded = [
                v for k, v in getattr(report, "user_properties", []) if k == CAMPAIGN_PROPERTY
            ]
            if len(recorded) > len(by_test.get(report.nodeid, [])):
                by_test[report.nodeid] = recorded
    rows = [row for test_rows in by_test.values() for row in test_rows]
    if rows:
        terminalreporter.write_sep("=", "reliability campaigns")
        for line in campaign_table(rows):
            terminalreporter.write_line(line)


@pytest.fixture
def cri_socket() -> Iterator[str]:
    """A fake CRI answering Version (tests/fake_cri.py), on a short socket path."""
    with fake_cri_socket() as socket_path:
        yield socket_path


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    """Commands run in-process point the root logger at the sys.stderr of their test; put the
    handlers and level back, so a later test's threads never log into a closed capture."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def node(tmp_path: Path) -> NodeTree:
    """A node tree in tmp_path (tests/support/node.py) with one foreign entry in each file."""
    return NodeTree.create(
        tmp_path / "node", toml=MINIMAL_FOREIGN_TOML, json_text=MINIMAL_FOREIGN_JSON
    )


@pytest.fixture
def start_agent(
    node: NodeTree, kube_api: KubeApiServer, cri_socket: str, tmp_path: Path
) -> Iterator[StartAgent]:
    """Starts `node-agent run` in this process for `node` (tests/support/agent.py), following
    the Secret `support.settings.SECRET` with short intervals; with `restart=True` it
    restarts "containerd" through `RESTART_SCRIPT` (the node's restart log); `targets` and
    `recover_stuck_pods` as the flags. Every agent started must stop within 4 s at teardown."""
    running: list[Agent] = []
    script = tmp_path / "restart.sh"
    script.write_text(RESTART_SCRIPT)
    script.chmod(0o755)

    def start(
        *,
        secrets: tuple[ObjectRef, ...] = (SECRET,),
        secret_files: tuple[Path, ...] = (),
        restart: bool = False,
        on_secret_delete: str = "remove",
        resync_interval: float = 60.0,
        targets: tuple[str, ...] = DEFAULT_TARGETS,
        recover_stuck_pods: bool = False,
    ) -> Agent:
        settings = agent_settings(
            node,
            kube_api,
            cri_socket=cri_socket,
            restart_command=restart_script_command(node, script) if restart else (),
            secrets=secrets,
            secret_files=secret_files,
            on_secret_delete=on_secret_delete,
            resync_interval=resync_interval,
        )
        settings = replace(
            settings,
            node=replace(settings.node, targets=targets),
            recover_stuck_pods=recover_stuck_pods,
        )
        agent = start_in_process(settings, node, kube_api, fast_timings(resync_interval))
        running.append(agent)
        return agent

    yield start
    for agent in running:
        agent.stop()
