"""The one worker: takes a batch of triggers from the queue and runs one reconcile pass.

A pass: re-read the file sources, merge every source's last good credentials, then

- wait, if a source has not been read yet (nothing is removed on a guess);
- do nothing, if only file or source events came and the credentials and every file are
  exactly as the last pass left them (the echo of our own write);
- count a no-op without reading any file format, if that last pass left everything in sync
  (a resync that finds nothing, the usual case);
- otherwise reconcile, allowed to restart containerd when the restart interval has passed
  and, with restart slots, this node holds one. When the `Outcome` says containerd is owed
  a restart it was not allowed to make, ask for one more pass when it is (a timer for the
  interval; the slot's `on_granted` for a slot).

A failed pass is retried with jittered exponential backoff (reset by a successful pass).
Nothing here talks to Prometheus or the API: a `PassReport` goes to the `Reporter`, and the
`Outcome` of every pass that wrote (dry runs excepted) to `on_outcome`, if given.
"""

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

from node_agent.backoff import Backoff
from node_agent.credentials import Credentials
from node_agent.daemon.credential_sources import CredentialSources, SourceChange
from node_agent.daemon.outcomes import Settled, TargetWrite, read_fingerprint, written_targets
from node_agent.daemon.restarts import RestartGate
from node_agent.daemon.work_queue import Batch, Trigger, WorkQueue
from node_agent.errors import InternalError, NodeAgentError, RestartFailed, WriteFailed, unexpected
from node_agent.host_paths import resolve_in_root
from node_agent.preview import change_summary
from node_agent.reconcile import Fingerprint, Outcome, Reconciler, RestartResult

log = logging.getLogger(__name__)

PassResult = Literal["applied", "noop", "error"]
"""The `result` label of `node_agent_reconcile_total`."""

WORKER_LOOP = "worker"
"""The worker's name for `Health.beat`."""

RESYNC = Trigger("resync")
RESTART_ALLOWED = Trigger("restart")
RETRY = Trigger("retry")
START = Trigger("start")


@dataclass(frozen=True)
class PassReport:
    """What one pass did, for metrics and events."""

    result: PassResult
    duration: float = 0.0
    writes: tuple[TargetWrite, ...] = ()
    in_sync: Mapping[str, bool] = field(default_factory=dict)
    """Per target, after the pass."""
    managed: Mapping[str, int] = field(default_factory=dict)
    """Registries per target, for the targets this pass saw."""
    fully_in_sync: bool = False
    restart: RestartResult | None = None
    error: str | None = None
    kubelet_restart_needed: bool = False
    """The pass changed a file the kubelet reads only when it starts."""


class Reporter(Protocol):
    """Where the worker's findings go (metrics, events, readiness)."""

    def pass_done(self, report: PassReport) -> None: ...

    def credentials_empty(self, removed: int) -> None:
        """A pass with credentials that name no registry took `removed` entries off."""
        ...

    def source_changed(self, change: SourceChange) -> None: ...


class RestartSlot(Protocol):
    """Fleet-wide permission to restart containerd (`restart_slots.RestartSlots`)."""

    def may_restart(self) -> bool: ...

    def request(self) -> None: ...

    def pass_done(self, *, restart: str | None, containerd_in_sync: bool, failed: bool) -> None: ...


class HealthBeat(Protocol):
    def beat(self, loop: str) -> None: ...


class ReadinessTracker(Protocol):
    def pass_succeeded(self) -> None: ...

    def internal_error(self, message: str) -> None:
        """Not ready until the next successful pass: the agent hit a bug."""
        ...

    def update(self) -> None: ...


@dataclass(frozen=True)
class WorkerTiming:
    """The worker's intervals, in seconds."""

    resync_interval: float = 300.0
    heartbeat: float = 10.0
    """Longest wait without a health beat while idle."""
    retry_initial: float = 1.0
    retry_max: float = 60.0


class Worker:
    """Runs passes for batches from `queue` until the queue is closed."""

    def __init__(
        self,
        *,
        queue: WorkQueue,
        sources: CredentialSources,
        reconciler: Reconciler,
        reporter: Reporter,
        readiness: ReadinessTracker,
        health: HealthBeat,
        timing: WorkerTiming | None = None,
        gate: RestartGate | None = None,
        slot: RestartSlot | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        """`gate` and `slot`: what a containerd restart waits for (None: nothing).
        `on_outcome`: told of each pass's `Outcome` (stuck-pod recovery); must not block."""
        self._queue = queue
        self._sources = sources
        self._reconciler = reconciler
        self._reporter = reporter
        self._readiness = readiness
        self._health = health
        self._timing = timing or WorkerTiming()
        self._gate = gate
        self._slot = slot
        self._clock = clock
        self._on_outcome = on_outcome
        self._retry = Backoff(
            initial=self._timing.retry_initial,
            maximum=self._timing.retry_max,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not cryptography
        )
        self._left: Settled | None = None
        """The credentials of the last pass and what it left every file holding."""
        self._left_in_sync = False
        """Whether that pass left every target in sync (containerd restarted too)."""
        self._applied: dict[str, Credentials] = {}
        self._last_error: str | None = None
        self._last_waiting: list[str] = []
        self._last_warnings: tuple[str, ...] = ()

    def run(self) -> None:
        """The loop: start with a pass, resync periodically, end when the queue closes."""
        self._queue.request(START)
        self._arm_resync()
        while not self._queue.closed:
            batch = self._queue.take(timeout=self._timing.heartbeat)
            self._health.beat(WORKER_LOOP)
            if batch is not None:
                self._handle_safely(batch)
        log.info("worker stopped")

    def handle(self, batch: Batch) -> PassReport | None:
        """One batch; its report, or None when no pass was needed or possible."""
        if RESYNC in batch.triggers:
            self._arm_resync()
        for change in self._sources.refresh_files():
            self._reporter.source_changed(change)
        credentials = self._sources.merged()
        if credentials is None:
            self._wait_for_sources()
            return None
        if self._left is not None and self._left.still_holds(credentials):
            if batch.only("node-file", "source-file", "source"):
                # The echo of our own write, or a change that changed nothing we use.
                log.debug("nothing to do for %s: node files as the agent left them", batch)
                return None
            if self._left_in_sync:
                report = self._unchanged_report()
                self._reporter.pass_done(report)
                return report
        report = self._run_pass(batch, credentials)
        self._reporter.pass_done(report)
        return report

    # passes

    def _handle_safely(self, batch: Batch) -> None:
        try:
            ran = self.handle(batch) is not None
        except Exception as error:  # a bug must not end the agent's only worker
            self._report_bug(unexpected(error, doing=f"handling {batch}"))
            ran = True
        if ran:
            self._queue.finished()
            self._health.beat(WORKER_LOOP)

    def _run_pass(self, batch: Batch, credentials: Credentials) -> PassReport:
        log.info("reconciling: %s", batch)
        started = self._clock()
        may_restart = self._may_restart()
        try:
            outcome = self._reconciler.reconcile(credentials, may_restart=may_restart)
            report = self._report_of(credentials, outcome, held_back=not may_restart)
        except NodeAgentError as error:
            report = self._failed_pass(credentials, error)
        except Exception as error:  # a bug: a failed pass like any other, and not ready
            report = self._failed_pass(credentials, unexpected(error, doing="reconciling"))
        report = replace(report, duration=self._clock() - started)
        if self._slot is not None and self._reconciler.restarts_containerd:
            self._slot.pass_done(
                restart=report.restart,
                containerd_in_sync=all(
                    report.in_sync.get(name, False) for name in self._restarting_targets
                ),
                failed=report.result == "error",
            )
        return report

    def _report_of(
        self, credentials: Credentials, outcome: Outcome, *, held_back: bool
    ) -> PassReport:
        restart = outcome.restart
        if restart is not None and self._gate is not None:
            self._gate.record_attempt(at=restart.last_attempt_at)
        if outcome.dry_run:
            return self._dry_run_report(outcome)
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        if restart is not None and not restart.succeeded:
            report = self._failed_pass(credentials, RestartFailed(restart.error or restart.result))
            return replace(report, restart=restart.result)
        if held_back and outcome.restart_owed:
            self._wait_for_restart()
        if not credentials and outcome.removed:
            self._reporter.credentials_empty(outcome.removed)
        report = self._succeeded(credentials, outcome, held_back=held_back)
        return replace(report, restart=None if restart is None else restart.result)

    def _may_restart(self) -> bool:
        if self._gate is not None and not self._gate.is_open():
            return False
        return self._slot is None or self._slot.may_restart()

    def _wait_for_restart(self) -> None:
        """containerd's file waits for a restart: come back when one is allowed."""
        if self._gate is not None and not self._gate.is_open():
            opens_at = self._gate.opens_at()
            log.info(
                "containerd: restarted recently; next restart in %.1fs", opens_at - self._clock()
            )
            self._queue.schedule(RESTART_ALLOWED, at=opens_at)
        elif self._slot is not None:
            log.info("containerd: config change waits for a restart slot")
            self._slot.request()

    def _succeeded(
        self, credentials: Credentials, outcome: Outcome, *, held_back: bool
    ) -> PassReport:
        self._log_new_warnings(outcome.warnings)
        writes = written_targets(outcome, credentials, self._applied)
        in_sync = outcome.in_sync_by_target
        # A file waiting for a restart has not been brought in sync with these credentials.
        self._applied.update(
            {name: credentials for name, ok in in_sync.items() if ok or not held_back}
        )
        fully = all(in_sync.values())
        self._left = Settled(credentials, {**outcome.fingerprints, **self._state_fingerprint()})
        self._left_in_sync = fully
        self._retry.reset()
        self._last_error = None
        self._readiness.pass_succeeded()
        return PassReport(
            result="applied" if outcome.changed else "noop",
            writes=tuple(writes),
            in_sync=in_sync,
            managed=outcome.registries_by_target,
            fully_in_sync=fully,
            kubelet_restart_needed=outcome.kubelet_restart_needed,
        )

    def _dry_run_report(self, outcome: Outcome) -> PassReport:
        for prepared in outcome.files:
            for line in change_summary(prepared):
                log.info("dry run: would %s", line)
        self._readiness.pass_succeeded()
        in_sync = outcome.in_sync_by_target
        return PassReport(
            result="noop",
            in_sync=in_sync,
            managed=outcome.registries_by_target,
            fully_in_sync=all(in_sync.values()),
        )

    def _log_new_warnings(self, warnings: tuple[str, ...]) -> None:
        """Skipped credentials, once per change: every pass would find them again."""
        for warning in warnings:
            if warning not in self._last_warnings:
                log.warning("%s", warning)
        self._last_warnings = warnings

    def _report_bug(self, error: InternalError) -> None:
        """A failure outside a pass: counted, logged and raised as a failed pass would be."""
        log.error("%s", error)
        self._readiness.internal_error(str(error))
        self._reporter.pass_done(PassReport(result="error", error=str(error)))
        self._queue.schedule(RETRY, at=self._clock() + self._retry.next_delay())

    def _failed_pass(self, credentials: Credentials, error: NodeAgentError) -> PassReport:
        if isinstance(error, InternalError):
            self._readiness.internal_error(str(error))
        self._left = Settled(credentials, self._current_fingerprints())
        self._left_in_sync = False
        message = str(error)
        delay = self._retry.next_delay()
        if message != self._last_error:
            log.error("reconcile failed: %s (retrying in %.1fs)", message, delay)
        else:
            log.debug("reconcile failed again: %s (retrying in %.1fs)", message, delay)
        self._last_error = message
        self._queue.schedule(RETRY, at=self._clock() + delay)
        return PassReport(result="error", in_sync=self._in_sync_now(credentials), error=message)

    def _in_sync_now(self, credentials: Credentials) -> dict[str, bool]:
        """After a failure: what the files hold now, as far as they can be read."""
        try:
            return self._reconciler.inspect(credentials).in_sync_by_target
        except NodeAgentError:
            return dict.fromkeys(self._target_names, False)

    def _unchanged_report(self) -> PassReport:
        return PassReport(
            result="noop", in_sync=dict.fromkeys(self._target_names, True), fully_in_sync=True
        )

    # helpers

    @property
    def _target_names(self) -> list[str]:
        return [node_file.name for node_file in self._reconciler.node_files]

    @property
    def _restarting_targets(self) -> list[str]:
        return [f.name for f in self._reconciler.node_files if f.restarts_containerd]

    def _current_fingerprints(self) -> dict[Path, Fingerprint | str]:
        """What the files hold now (after a failed pass, whose writes are unknown)."""
        return {
            _resolved(node_file.root, node_file.path): read_fingerprint(
                node_file.path, root=node_file.root
            )
            for node_file in self._reconciler.node_files
        } | self._state_fingerprint()

    def _state_fingerprint(self) -> dict[Path, Fingerprint | str]:
        store = self._reconciler.state_store
        return {store.path: read_fingerprint(store.path, root=store.root)}

    def _arm_resync(self) -> None:
        self._queue.schedule(RESYNC, at=self._clock() + self._timing.resync_interval)

    def _wait_for_sources(self) -> None:
        waiting = self._sources.waiting_for()
        if waiting != self._last_waiting:
            log.info("waiting for a first good read of %s before reconciling", ", ".join(waiting))
            self._last_waiting = waiting
        self._readiness.update()


def _resolved(root: Path, path: Path) -> Path:
    """`path` with links followed inside `root`, as passes key their fingerprints; as given
    when that is impossible (a symlink loop): `read_fingerprint` then reports why."""
    try:
        return resolve_in_root(root, path).path
    except WriteFailed:
        return path
