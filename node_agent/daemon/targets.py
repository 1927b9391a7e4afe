"""The reconcilers a daemon pass chooses from, built once from `Settings`.

While a containerd restart is not allowed (`RestartGate` closed), a pass uses the reconciler
over the files that need no restart only: the reconciler keeps what the agent owns in the
other files and a pending restart stays pending; containerd's file is then only inspected,
to know whether a pass is owed once the gate opens.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node_agent import app
from node_agent.daemon.restarts import RecordingRestart, RestartGate
from node_agent.ownership import StateStore
from node_agent.reconcile import NodeFile, Reconciler
from node_agent.settings import Settings


@dataclass(frozen=True)
class RestartControl:
    """How containerd restarts are made and limited (absent with `--reload none`)."""

    gate: RestartGate
    recorder: RecordingRestart
    without_restart: Reconciler
    """The files that need no containerd restart."""
    containerd_only: Reconciler
    """containerd's file alone, for inspection while the gate is closed."""

    @property
    def names(self) -> tuple[str, ...]:
        """The targets whose change needs a containerd restart."""
        return tuple(node_file.name for node_file in self.containerd_only.node_files)


@dataclass(frozen=True)
class NodeTargets:
    """The node files and the reconcilers over them."""

    files: tuple[NodeFile, ...]
    state_store: StateStore
    full: Reconciler
    restarts: RestartControl | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(node_file.name for node_file in self.files)

    @property
    def state_file(self) -> Path:
        return self.state_store.path


def build_targets(
    settings: Settings, *, min_reload_interval: float, clock: Callable[[], float] = time.monotonic
) -> NodeTargets:
    files = tuple(app.node_files(settings))
    store = StateStore(settings.on_host(settings.state_dir))
    reload = None if settings.dry_run else app.containerd_reload(settings)
    if reload is None:
        return NodeTargets(files, store, Reconciler(files, store, None), None)
    gate = RestartGate(min_interval=min_reload_interval, clock=clock)
    recorder = RecordingRestart(reload, gate)
    control = RestartControl(
        gate=gate,
        recorder=recorder,
        without_restart=Reconciler([f for f in files if not f.restarts_containerd], store, None),
        containerd_only=Reconciler([f for f in files if f.restarts_containerd], store, recorder),
    )
    return NodeTargets(files, store, Reconciler(files, store, recorder), control)
