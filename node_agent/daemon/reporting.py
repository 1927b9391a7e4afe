"""What the daemon tells the outside: metrics, Kubernetes Events on the Node, readiness.

Event messages name registries, sources and files, never credential values: the registry
keys come from the plans, the problems from `InvalidCredentials` / `RestartFailed` and the
other `NodeAgentError`s of a failed pass, whose messages carry no values by construction.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from node_agent.containerd_versions import ConfigTomlAuth, ContainerdSupport
from node_agent.daemon.credential_sources import CredentialSources, SourceChange
from node_agent.daemon.outcomes import TargetWrite
from node_agent.daemon.worker import PassReport
from node_agent.escaping import printable
from node_agent.kube.errors import ErrorReason
from node_agent.kubelet_start import KubeletRestartCheck
from node_agent.metrics import AgentMetrics
from node_agent.preview import empty_credentials_warning

log = logging.getLogger(__name__)

EventType = Literal["Normal", "Warning"]

APPLIED = "RegistryCredentialsApplied"
DRIFT_REPAIRED = "RegistryCredentialsDriftRepaired"
INVALID = "RegistryCredentialsInvalid"
ROLLED_BACK = "ContainerdRestartRolledBack"
RECONCILE_FAILED = "RegistryCredentialsReconcileFailed"
EMPTY = "RegistryCredentialsEmpty"
KUBELET_RESTART_NEEDED = "KubeletRestartNeeded"
#: What the node's containerd means for config.toml auth, when it is not plain writing.
CONTAINERD_SUPPORT = {
    ConfigTomlAuth.WRITE_WITH_WARNING: "ContainerdTransferServiceOff",
    ConfigTomlAuth.LEAVE_ALONE: "ContainerdConfigTomlLeftAlone",
}


KUBELET_RESTART_NEEDED_MESSAGE = (
    "changed the registries of the node-agent-credential-provider entry in the kubelet's "
    "CredentialProviderConfig; the kubelet reads it only when it starts: restart the kubelet "
    "on this node for images of the new registries to get credentials from the plugin"
)


class EventSink(Protocol):
    """`NodeEventRecorder`'s interface: queue an Event about the Node, never raise."""

    def record(self, reason: str, message: str, *, type: EventType = "Normal") -> None: ...

    def close(self, timeout: float = 2.0) -> bool:
        """Deliver what is queued (within `timeout`) and stop."""
        ...


class NoEvents:
    """`--no-events`: Events are not recorded."""

    def record(self, reason: str, message: str, *, type: EventType = "Normal") -> None:
        log.debug("event %s not recorded (events are off)", reason)

    def close(self, timeout: float = 2.0) -> bool:
        return True


class ReadinessSink(Protocol):
    def set_ready(self, ready: bool, reason: str) -> None: ...


def readiness_of(
    *,
    first_pass_done: bool,
    problems: dict[str, str],
    waiting: Sequence[str],
    internal_error: str | None = None,
) -> tuple[bool, str]:
    """Ready once a pass succeeded, while every source is valid and no bug has been hit
    since the last successful pass."""
    if internal_error is not None:
        return False, internal_error
    if problems:
        return False, "invalid credentials source: " + "; ".join(problems.values())
    if waiting:
        return False, "waiting for a first good read of " + ", ".join(waiting)
    if not first_pass_done:
        return False, "waiting for the first successful reconcile"
    return True, "ok"


class Readiness:
    """Keeps /readyz in line with the sources and the first successful pass."""

    def __init__(self, health: ReadinessSink, sources: CredentialSources) -> None:
        self._health = health
        self._sources = sources
        self._lock = threading.Lock()
        self._first_pass_done = False
        self._internal_error: str | None = None

    def pass_succeeded(self) -> None:
        with self._lock:
            self._first_pass_done = True
            self._internal_error = None
        self.update()

    def internal_error(self, message: str) -> None:
        with self._lock:
            self._internal_error = message
        self.update()

    def update(self) -> None:
        with self._lock:  # one update at a time: watchers and the worker both call this
            ready, reason = readiness_of(
                first_pass_done=self._first_pass_done,
                problems=self._sources.problems(),
                waiting=self._sources.waiting_for(),
                internal_error=self._internal_error,
            )
            self._health.set_ready(ready, printable(reason))


class DaemonReporter:
    """The worker's and the sources' findings → metrics, Events, readiness."""

    def __init__(
        self,
        *,
        metrics: AgentMetrics,
        events: EventSink,
        readiness: Readiness,
        wall_clock: Callable[[], float] = time.time,
        kubelet_check: KubeletRestartCheck | None = None,
    ) -> None:
        """`kubelet_check`: whether the kubelet still runs an older CredentialProviderConfig
        (None: the credential-provider target is off)."""
        self._metrics = metrics
        self._events = events
        self._readiness = readiness
        self._wall_clock = wall_clock
        self._kubelet_check = kubelet_check
        self._changed_provider_entry = False

    def pass_done(self, report: PassReport) -> None:
        metrics = self._metrics
        metrics.reconcile_total.labels(result=report.result).inc()
        metrics.reconcile_duration_seconds.observe(report.duration)
        for target, in_sync in report.in_sync.items():
            metrics.in_sync.labels(target=target).set(1 if in_sync else 0)
        for target, count in report.managed.items():
            metrics.managed_registries.labels(target=target).set(count)
        if report.fully_in_sync:
            metrics.last_success_timestamp_seconds.set(self._wall_clock())
        if report.restart is not None:
            metrics.containerd_restarts_total.labels(result=report.restart).inc()
        self._report_writes(report.writes)
        if report.kubelet_restart_needed:
            self._kubelet_restart_needed()
        self._report_kubelet_restart()
        if report.restart == "rolled_back":
            self._events.record(ROLLED_BACK, rolled_back_message(report.error), type="Warning")
        elif report.result == "error":
            # The same error on every retry is the same Event: the recorder bumps its count.
            self._events.record(
                RECONCILE_FAILED, reconcile_failed_message(report.error), type="Warning"
            )

    def _kubelet_restart_needed(self) -> None:
        message = KUBELET_RESTART_NEEDED_MESSAGE
        log.warning("%s", message)
        self._changed_provider_entry = True
        self._events.record(KUBELET_RESTART_NEEDED, message, type="Warning")

    def _report_kubelet_restart(self) -> None:
        """1 while the kubelet started before its CredentialProviderConfig last changed, as
        systemd says; where it cannot say, 1 once this agent changed its entry there."""
        if self._kubelet_check is None and not self._changed_provider_entry:
            return
        known = None if self._kubelet_check is None else self._kubelet_check()
        needed = self._changed_provider_entry if known is None else known
        self._metrics.kubelet_restart_needed.set(1 if needed else 0)

    def credentials_empty(self, removed: int) -> None:
        message = empty_credentials_warning(removed)
        log.warning("%s", message)
        self._events.record(EMPTY, message, type="Warning")

    def containerd_found(self, support: ContainerdSupport) -> None:
        """Said once, at start: what this containerd means for config.toml auth."""
        reason = CONTAINERD_SUPPORT.get(support.auth)
        if reason is None:
            log.info("%s", support.describe())
            return
        log.warning("%s", support.describe())
        self._events.record(reason, support.describe(), type="Warning")

    def source_changed(self, change: SourceChange) -> None:
        if change.new_problem is not None:
            self.source_error(change.source, "invalid")
            self._events.record(
                INVALID,
                f"{change.new_problem}; keeping the last good credentials of this source",
                type="Warning",
            )
        self._readiness.update()

    def source_error(self, source: str, reason: ErrorReason) -> None:
        self._metrics.source_errors_total.labels(source=source, reason=reason).inc()

    def watch_restarted(self, source: str) -> None:
        self._metrics.watch_restarts_total.labels(source=source).inc()

    def _report_writes(self, writes: Sequence[TargetWrite]) -> None:
        repaired = [write for write in writes if write.drift]
        applied = [write for write in writes if not write.drift]
        for write in repaired:
            self._metrics.drift_repairs_total.labels(target=write.target).inc()
        if repaired:
            log.warning("repaired entries changed by someone else: %s", describe_writes(repaired))
            self._events.record(
                DRIFT_REPAIRED,
                "repaired changes made outside the agent: " + describe_writes(repaired),
            )
        if applied:
            self._events.record(
                APPLIED, "applied registry credentials: " + describe_writes(applied)
            )


def describe_writes(writes: Sequence[TargetWrite]) -> str:
    """`/etc/containerd/config.toml: a.example, b.example; /var/lib/...: ...` (no values)."""
    return "; ".join(f"{write.path}: {', '.join(write.registries)}" for write in writes)


def reconcile_failed_message(error: str | None) -> str:
    """The one-line error of a failed pass (it names files and causes, never values)."""
    one_line = " ".join((error or "no detail").splitlines())
    return f"reconcile failed: {one_line}; retrying with backoff"


def rolled_back_message(error: str | None) -> str:
    return (
        "containerd did not come back healthy with the new config.toml; the previous "
        f"config.toml was restored and containerd restarted ({error or 'no detail'}). "
        "The change is retried after --min-reload-interval."
    )
