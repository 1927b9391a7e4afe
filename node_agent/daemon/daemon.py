"""The composition: sources, watches, the queue and its one worker, metrics, health, Events,
and the signals that end it all.

Threads: one `SecretWatcher` per API source and watchdog's observer only *request* passes;
the worker runs them; the status server answers scrapes and probes; the Event recorder
delivers Events; with --recover-stuck-pods, the worker hands each pass's `Outcome` to the
stuck-pod recovery thread, which lists and evicts pods on its own time. SIGTERM/SIGINT close
the queue (the pass in progress, with its write, finishes), stop the watches and the server,
and the process exits 0.

The `kubernetes` package is imported only when the API is used (API sources or Events): it
costs ~0.6 s and ~68 MB, which a file-only agent does not need to pay.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from node_agent.daemon.credential_sources import CredentialSources
from node_agent.daemon.file_watch import (
    DirectoryWatch,
    Interest,
    interest_in_file,
    interest_in_source,
)
from node_agent.daemon.outcomes import applied_changes
from node_agent.daemon.reporting import DaemonReporter, EventSink, Readiness
from node_agent.daemon.restarts import RestartGate
from node_agent.daemon.slot_events import SlotEvents
from node_agent.daemon.work_queue import Batch, Trigger, WorkQueue
from node_agent.daemon.worker import (
    RESTART_ALLOWED,
    START,
    WORKER_LOOP,
    PassReport,
    Worker,
    WorkerTiming,
)
from node_agent.errors import NodeAgentError
from node_agent.kube.errors import ErrorReason
from node_agent.kube.model import LeaseApi, ObjectRef, PodApi, SecretApi
from node_agent.kube.secret_watch import (
    RestartCause,
    SecretSnapshot,
    SecretWatcher,
    WatchSettings,
    secret_content,
)
from node_agent.metrics import AgentMetrics
from node_agent.reconcile import Outcome
from node_agent.restart_slots.coordinator import RestartSlots, SlotConfig, SlotTiming
from node_agent.settings import DaemonSettings
from node_agent.status_server import Health, StatusServer
from node_agent.stuck_pods.recovery import RecoveryTiming, StuckPodRecovery
from node_agent.wiring import build_reconciler, containerd_support, kubelet_restart_check

log = logging.getLogger(__name__)

STOP_BUDGET_SECONDS = 4.0
"""SIGTERM to exit: the issue allows 5 s; the rest is interpreter shutdown."""

_FILE_WATCH_LOOP = "file-watch"
_SLOTS_LOOP = "restart-slots"
_STUCK_PODS_LOOP = "stuck-pods"


class StartupFailed(NodeAgentError):
    """The daemon could not start (port taken, API client configuration unusable)."""


class ApiClient(SecretApi, LeaseApi, PodApi, Protocol):
    """The Kubernetes API as the daemon uses it (`node_agent.kube.client.KubeApi`)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class DaemonParts:
    """What the daemon talks to; `build_daemon` makes the real ones, tests may swap some."""

    metrics: AgentMetrics
    health: Health
    events: EventSink
    api: ApiClient | None
    status: StatusServer | None
    watch_settings: WatchSettings
    timing: WorkerTiming
    slot_timing: SlotTiming = field(default_factory=SlotTiming)
    recovery_timing: RecoveryTiming = field(default_factory=RecoveryTiming)
    clock: Callable[[], float] = time.monotonic


class _Beats:
    """The worker's heartbeat also vouches for the other loops whose threads are alive, so
    /healthz fails when any of them died."""

    def __init__(self, health: Health, others: Callable[[], dict[str, Callable[[], bool]]]) -> None:
        self._health = health
        self._others = others

    def beat(self, loop: str) -> None:
        self._health.beat(loop)
        for name, alive in self._others().items():
            if alive():
                self._health.beat(name)


class Daemon:
    """`node-agent run`: `start()`, then `stop()`; or `run_once()`."""

    def __init__(self, settings: DaemonSettings, parts: DaemonParts) -> None:
        self.settings = settings
        self.parts = parts
        node = settings.node
        self.sources = CredentialSources(
            secrets=settings.secrets,
            files=node.secret_files,
            fallback_secrets=settings.fallback_secrets,
            fallback_files=node.fallback_secret_files,
            on_delete=settings.on_secret_delete,
        )
        self.containerd = containerd_support(node)
        self.reconciler = build_reconciler(node, support=self.containerd, clock=parts.clock)
        self.gate = (
            RestartGate(min_interval=settings.min_restart_interval, clock=parts.clock)
            if self.reconciler.restarts_containerd
            else None
        )
        self.queue = WorkQueue(debounce=settings.debounce, clock=parts.clock)
        readiness = Readiness(parts.health, self.sources)
        self.reporter = DaemonReporter(
            metrics=parts.metrics,
            events=parts.events,
            readiness=readiness,
            kubelet_check=kubelet_restart_check(settings.node, self.reconciler),
        )
        self.reporter.containerd_found(self.containerd)
        self.file_watch = DirectoryWatch(self._interests())
        self.slots = self._restart_slots()
        self.stuck_pods = self._stuck_pod_recovery()
        self.worker = Worker(
            queue=self.queue,
            sources=self.sources,
            reconciler=self.reconciler,
            reporter=self.reporter,
            readiness=readiness,
            health=_Beats(parts.health, self._other_loops),
            timing=parts.timing,
            gate=self.gate,
            slot=self.slots,
            clock=parts.clock,
            on_outcome=None if self.stuck_pods is None else self._hand_to_stuck_pods,
        )
        self._worker_thread = threading.Thread(target=self.worker.run, name="worker", daemon=True)
        self._watchers = [self._watcher(ref) for ref in self.sources.secret_refs]
        self._watch_threads = {
            f"secret-watch {watcher.ref}": threading.Thread(
                target=watcher.run, name=f"secret-watch {watcher.ref}", daemon=True
            )
            for watcher in self._watchers
        }

    # lifecycle

    def start(self) -> None:
        """Serve status, watch files and Secrets, run the worker. Returns at once."""
        if self.parts.status is not None:
            try:
                self.parts.status.start()
            except OSError as error:
                raise StartupFailed(
                    f"cannot serve metrics on {self.settings.metrics_address}: "
                    f"{error.strerror or error}"
                ) from error
        health = self.parts.health
        health.register_loop(WORKER_LOOP)
        for loop in self._other_loops():
            health.register_loop(loop)
        self.file_watch.start()
        if self.slots is not None:
            self.slots.start()
        if self.stuck_pods is not None:
            self.stuck_pods.start()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = STOP_BUDGET_SECONDS) -> bool:
        """Let the pass in progress finish, stop everything; True if all ended in time."""
        deadline = time.monotonic() + timeout
        self.queue.close()
        for watcher in self._watchers:
            watcher.stop(timeout=0)  # interrupts its stream; our thread is joined below
        self.file_watch.stop(timeout=_left(deadline))
        started = [thread for thread in self._threads if thread.ident is not None]
        for thread in started:
            thread.join(_left(deadline))
        stopped = not any(thread.is_alive() for thread in started)
        if self.stuck_pods is not None:
            stopped = self.stuck_pods.stop(timeout=_left(deadline)) and stopped
        if self.slots is not None:
            # After the worker: the pass in progress may still restart under the slot.
            stopped = self.slots.stop(timeout=_left(deadline)) and stopped
        if self.parts.status is not None:
            self.parts.status.stop()
        self._close_api(deadline)
        if not stopped:
            log.warning("stopping: some threads were still busy after %.1fs", timeout)
        return stopped

    def run_once(self) -> PassReport | None:
        """Read every source once (one list per Secret), run one pass. None: no pass ran
        (a source is invalid or missing; the log says which)."""
        for ref in self.sources.secret_refs:
            self._on_secret_change(ref, self._list_once(ref))
        report = self.worker.handle(Batch(frozenset({START})))
        self._close_api(time.monotonic() + 1.0)
        return report

    @property
    def status_port(self) -> int | None:
        return None if self.parts.status is None else self.parts.status.port

    def _restart_slots(self) -> RestartSlots | None:
        settings = self.settings
        if not settings.coordinates_restarts or not self.reconciler.restarts_containerd:
            return None
        restarts = settings.restarts
        if self.parts.api is None or not settings.node_name or not restarts.lease_namespace:
            raise StartupFailed(
                "restart slots need the Kubernetes API, --node-name and "
                "--restart-lease-namespace; or --restart-concurrency 0"
            )
        config = SlotConfig(
            node=settings.node_name,
            namespace=restarts.lease_namespace,
            concurrency=restarts.concurrency,
            lease_ttl=restarts.lease_ttl,
            max_wait=restarts.max_wait,
            settle=restarts.settle,
        )
        return RestartSlots(
            api=self.parts.api,
            config=config,
            reporter=SlotEvents(metrics=self.parts.metrics, events=self.parts.events),
            on_granted=functools.partial(self.queue.request, RESTART_ALLOWED),
            timing=self.parts.slot_timing,
        )

    def _stuck_pod_recovery(self) -> StuckPodRecovery | None:
        settings = self.settings
        if not settings.recover_stuck_pods:
            return None
        if self.parts.api is None or not settings.node_name:
            raise StartupFailed("--recover-stuck-pods needs the Kubernetes API and --node-name")
        self.parts.metrics.add_stuck_pod_recovery()
        return StuckPodRecovery(
            api=self.parts.api,
            node=settings.node_name,
            rate_per_minute=settings.recover_stuck_pods_rate,
            metrics=self.parts.metrics,
            timing=self.parts.recovery_timing,
            clock=self.parts.clock,
        )

    def _hand_to_stuck_pods(self, outcome: Outcome) -> None:
        assert self.stuck_pods is not None
        self.stuck_pods.credentials_applied(applied_changes(outcome, at=self.parts.clock()))

    # sources → queue

    def _watcher(self, ref: ObjectRef) -> SecretWatcher:
        assert self.parts.api is not None, "API sources need an API client"
        return SecretWatcher(
            ref.namespace,
            ref.name,
            api=self.parts.api,
            on_change=functools.partial(self._on_secret_change, ref),
            on_error=functools.partial(self._on_source_error, ref),
            on_watch_restart=functools.partial(self._on_watch_restart, ref),
            settings=self.parts.watch_settings,
        )

    def _on_secret_change(self, ref: ObjectRef, snapshot: SecretSnapshot) -> None:
        change = self.sources.apply_secret(ref, snapshot)
        self.reporter.source_changed(change)
        if change.credentials_changed:
            self.queue.request(Trigger("source", str(ref)))

    def _on_source_error(self, ref: ObjectRef, reason: ErrorReason) -> None:
        self.reporter.source_error(str(ref), reason)

    def _on_watch_restart(self, ref: ObjectRef, cause: RestartCause) -> None:
        self.reporter.watch_restarted(str(ref))

    def _list_once(self, ref: ObjectRef) -> SecretSnapshot:
        assert self.parts.api is not None, "API sources need an API client"
        settings = self.parts.watch_settings
        listing = self.parts.api.list_secret(
            ref, request_timeout=(settings.connect_timeout, settings.list_read_timeout)
        )
        item = next((i for i in listing.items if _name_of(i) == ref.name), None)
        content = None if item is None else secret_content(ref, item)
        return SecretSnapshot(content, listing.resource_version)

    def _interests(self) -> list[Interest]:
        node_files = [
            interest_in_file(node_file.path, self._requester(Trigger("node-file", node_file.name)))
            for node_file in self.reconciler.node_files
        ]
        source_files = [
            interest_in_source(path, self._requester(Trigger("source-file", str(path))))
            for path in self.sources.file_paths
        ]
        return node_files + source_files

    def _requester(self, trigger: Trigger) -> Callable[[], None]:
        return functools.partial(self.queue.request, trigger)

    # helpers

    @property
    def _threads(self) -> list[threading.Thread]:
        return [self._worker_thread, *self._watch_threads.values()]

    def _other_loops(self) -> dict[str, Callable[[], bool]]:
        loops = {name: thread.is_alive for name, thread in self._watch_threads.items()}
        if self.slots is not None:
            loops[_SLOTS_LOOP] = self.slots.is_alive
        if self.stuck_pods is not None:
            loops[_STUCK_PODS_LOOP] = self.stuck_pods.is_alive
        return {_FILE_WATCH_LOOP: self.file_watch.is_alive, **loops}

    def _close_api(self, deadline: float) -> None:
        self.parts.events.close(timeout=_left(deadline))
        if self.parts.api is not None:
            self.parts.api.close()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _name_of(obj: object) -> str | None:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    return metadata.get("name") if isinstance(metadata, dict) else None
