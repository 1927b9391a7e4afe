"""Wires `Settings` into the pieces (sources, node file formats, state, containerd restart)
and runs the one-shot commands. Returns exit codes; only `node_agent.cli` exits."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from node_agent.credentials import Credentials
from node_agent.errors import ReloadFailed
from node_agent.ownership import StateStore
from node_agent.reconcile import ContainerdRestart, NodeFile, Outcome, Reconciler
from node_agent.report import change_summary, redacted_diff
from node_agent.runtime import Restarter, make_restarter, restart_and_check
from node_agent.secret_files import load_credentials
from node_agent.settings import Settings
from node_agent.targets.containerd import ContainerdFormat
from node_agent.targets.kubelet import KubeletFormat

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_OUT_OF_SYNC = 3


@dataclass(frozen=True)
class RestartContainerd:
    """`ContainerdRestart` for real: restart through the chosen strategy, then wait for CRI."""

    restarter: Restarter
    socket_path: str
    timeout: float

    def restart_and_verify(self) -> None:
        restart_and_check(self.restarter, socket_path=self.socket_path, timeout=self.timeout)


def node_files(settings: Settings) -> list[NodeFile]:
    """The node files `settings.targets` selects, as paths reachable from here."""
    available = {
        "containerd": NodeFile(
            ContainerdFormat(new_file_version=settings.containerd_config_version),
            settings.on_host(settings.containerd_config),
            restarts_containerd=True,
            root=settings.host_root,
        ),
        "kubelet": NodeFile(
            KubeletFormat(), settings.on_host(settings.kubelet_config), root=settings.host_root
        ),
    }
    return [available[name] for name in settings.targets]


def containerd_restart(settings: Settings) -> ContainerdRestart | None:
    """How containerd gets restarted, or None when it must not be (--reload none)."""
    if settings.reload == "none" or "containerd" not in settings.targets:
        return None
    restarter = make_restarter(
        settings.reload,
        command=settings.reload_command,
        bus_address=f"unix:path={settings.on_host(settings.system_bus_socket)}",
        trigger_dir=settings.on_host(settings.restart_trigger_dir),
        root=settings.host_root,
    )
    socket = str(settings.on_host(settings.containerd_socket))
    return RestartContainerd(restarter, socket, settings.reload_timeout)


def build_reconciler(
    settings: Settings, *, clock: Callable[[], float] = time.monotonic
) -> Reconciler:
    """The node's one reconciler (the one-shot commands' and the daemon's)."""
    return Reconciler(
        node_files=node_files(settings),
        state_store=StateStore(settings.on_host(settings.state_dir), root=settings.host_root),
        containerd=containerd_restart(settings),
        dry_run=settings.dry_run,
        clock=clock,
    )


def load_sources(settings: Settings) -> Credentials:
    # Secret files are the agent's own inputs (e.g. a mounted Secret volume), not node paths.
    return load_credentials(settings.secret_files, settings.fallback_secret_files)


def reconcile_command(settings: Settings, out: TextIO) -> int:
    """`node-agent reconcile`: one pass (or a redacted preview with --dry-run)."""
    outcome = build_reconciler(settings).reconcile(load_sources(settings))
    _warn(outcome)
    if outcome.dry_run:
        _print_preview(outcome, out)
        return EXIT_OK
    if outcome.restart is not None and outcome.restart.error is not None:
        raise ReloadFailed(outcome.restart.error)
    _print_result(outcome, out)
    return EXIT_OK


def check_command(settings: Settings, out: TextIO) -> int:
    """`node-agent check`: 0 when every file matches the credentials, 3 when not."""
    outcome = build_reconciler(settings).inspect(load_sources(settings))
    _warn(outcome)
    for prepared in outcome.files:
        for line in change_summary(prepared):
            print(f"out of sync: {line}", file=out)
    if outcome.restart_owed:
        print("out of sync: containerd: not restarted since config.toml changed", file=out)
    if outcome.in_sync:
        print("in sync", file=out)
        return EXIT_OK
    return EXIT_OUT_OF_SYNC


def _print_preview(outcome: Outcome, out: TextIO) -> None:
    for prepared in outcome.files:
        if not prepared.needs_write:
            print(f"{prepared.node_file.name}: in sync ({prepared.node_file.path})", file=out)
            continue
        for line in change_summary(prepared):
            print(f"would {line}", file=out)
        out.write(redacted_diff(prepared))


def _print_result(outcome: Outcome, out: TextIO) -> None:
    for prepared in outcome.files:
        changes = [f"{change.action} {change.key}" for change in prepared.plan.changes]
        summary = ", ".join(changes) if prepared.needs_write else "in sync"
        print(f"{prepared.node_file.name}: {summary}", file=out)
    if outcome.restart is not None:
        print("containerd: restarted, CRI answering", file=out)


def _warn(outcome: Outcome) -> None:
    for warning in outcome.warnings:
        log.warning(warning)


Command = Callable[[Settings, TextIO], int]
