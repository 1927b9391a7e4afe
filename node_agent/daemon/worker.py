"""The one worker: takes a batch of triggers from the queue and runs one reconcile pass.

A pass: re-read the file sources, merge every source's last good credentials, then

- wait, if a source has not been read yet (nothing is removed on a guess);
- do nothing, if only file or source events came and the credentials and every file are
  exactly as the last pass left them (the echo of our own write);
- count a no-op without reading any file format, if that last pass left everything in sync
  (a resync that finds nothing, the usual case);
- otherwise reconcile: with every file when a containerd restart is allowed (the restart
  interval has passed and, with restart slots, this node holds one), else with the files
  that need no restart, and ask for one more pass when the restart is allowed (a timer for
  the interval; the slot's `on_granted` for a slot).

A failed pass is retried with jittered exponential backoff (reset by a successful pass).
Nothing here talks to Prometheus or the API: a `PassReport` goes to the `Reporter`.
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
from node_agent.daemon.outcomes import (
    Fingerprint,
    Settled,
    TargetWrite,
    fingerprints_after,
    in_sync_after,
    managed_registries,
    read_fingerprint,
    written_targets,
)
from node_agent.daemon.restarts import RestartResult
from node_agent.daemon.sources import CredentialSources, SourceChange
from node_agent.daemon.targets import NodeTargets, RestartControl
from node_agent.daemon.work_queue import Batch, Trigger, WorkQueue
from node_agent.errors import InternalError, NodeAgentError, unexpected
from node_agent.reconcile import Outcome
from node_agent.report import change_summary

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


class Reporter(Protocol):
    """Where the worker's findings go (metrics, events, readiness)."""

    def pass_done(self, report: PassReport) -> None: ...

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
        targets: NodeTargets,
        reporter: Reporter,
        readiness: ReadinessTracker,
        health: HealthBeat,
        timing: WorkerTiming | None = None,
        slot: RestartSlot | None = None,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._queue = queue
        self._sources = sources
        self._targets = targets
        self._reporter = reporter
        self._readiness = readiness
        self._health = health
        self._timing = timing or WorkerTiming()
        self._slot = slot
        self._dry_run = dry_run
        self._clock = clock
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
        restarts = self._targets.restarts
        try:
            if self._dry_run:
                report = self._dry_run_pass(credentials)
            elif restarts is not None and not self._may_restart(restarts):
                report = self._pass_without_restart(credentials, restarts)
            else:
                report = self._full_pass(credentials)
        except NodeAgentError as error:
            report = self._failed_pass(credentials, error)
        except Exception as error:  # a bug: a failed pass like any other, and not ready
            report = self._failed_pass(credentials, unexpected(error, doing="reconciling"))
        restart = restarts.recorder.take_result() if restarts is not None else None
        report = replace(report, duration=self._clock() - started, restart=restart)
        if self._slot is not None and restarts is not None:
            self._slot.pass_done(
                restart=restart,
                containerd_in_sync=all(report.in_sync.get(name, False) for name in restarts.names),
                failed=report.result == "error",
            )
        return report

    def _may_restart(self, restarts: RestartControl) -> bool:
        return restarts.gate.is_open() and (self._slot is None or self._slot.may_restart())

    def _full_pass(self, credentials: Credentials) -> PassReport:
        outcome = self._targets.full.reconcile(credentials)
        in_sync = in_sync_after(outcome, written=True)
        return self._succeeded(
            credentials,
            outcome,
            in_sync=in_sync,
            fingerprints=fingerprints_after(outcome, written=True),
        )

    def _pass_without_restart(
        self, credentials: Credentials, restarts: RestartControl
    ) -> PassReport:
        """containerd restarted too recently: apply what needs no restart, and come back for
        containerd's file when the gate opens."""
        outcome = restarts.without_restart.reconcile(credentials)
        inspection = restarts.containerd_only.inspect(credentials)
        containerd_in_sync = in_sync_after(inspection, written=False)
        if all(containerd_in_sync.values()):
            self._applied.update(dict.fromkeys(containerd_in_sync, credentials))
        elif not restarts.gate.is_open():
            opens_at = restarts.gate.opens_at()
            log.info(
                "containerd: restarted recently; next restart in %.1fs", opens_at - self._clock()
            )
            self._queue.schedule(RESTART_ALLOWED, at=opens_at)
        elif self._slot is not None:
            log.info("containerd: config change waits for a restart slot")
            self._slot.request()
        fingerprints = {
            **fingerprints_after(outcome, written=True),
            **fingerprints_after(inspection, written=False),
        }
        in_sync = {**in_sync_after(outcome, written=True), **containerd_in_sync}
        report = self._succeeded(credentials, outcome, in_sync=in_sync, fingerprints=fingerprints)
        managed = {**managed_registries(inspection), **report.managed}
        return replace(report, managed=managed)

    def _succeeded(
        self,
        credentials: Credentials,
        outcome: Outcome,
        *,
        in_sync: dict[str, bool],
        fingerprints: Mapping[Path, Fingerprint],
    ) -> PassReport:
        self._log_new_warnings(outcome.warnings)
        writes = written_targets(outcome, credentials, self._applied)
        self._applied.update({p.node_file.name: credentials for p in outcome.files})
        fully = all(in_sync.values())
        self._left = Settled(credentials, {**fingerprints, **self._state_fingerprint()})
        self._left_in_sync = fully
        self._retry.reset()
        self._last_error = None
        self._readiness.pass_succeeded()
        return PassReport(
            result="applied" if outcome.changed else "noop",
            writes=tuple(writes),
            in_sync=in_sync,
            managed=managed_registries(outcome),
            fully_in_sync=fully,
        )

    def _dry_run_pass(self, credentials: Credentials) -> PassReport:
        outcome = self._targets.full.inspect(credentials)
        for prepared in outcome.files:
            for line in change_summary(prepared):
                log.info("dry run: would %s", line)
        self._readiness.pass_succeeded()
        in_sync = in_sync_after(outcome, written=False)
        return PassReport(
            result="noop",
            in_sync=in_sync,
            managed=managed_registries(outcome),
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
            return in_sync_after(self._targets.full.inspect(credentials), written=False)
        except NodeAgentError:
            return dict.fromkeys(self._targets.names, False)

    def _unchanged_report(self) -> PassReport:
        return PassReport(
            result="noop", in_sync=dict.fromkeys(self._targets.names, True), fully_in_sync=True
        )

    # helpers

    def _current_fingerprints(self) -> dict[Path, Fingerprint | str]:
        """What the files hold now (after a failed pass, whose writes are unknown)."""
        paths = [_resolved(node_file.path) for node_file in self._targets.files]
        return {path: read_fingerprint(path) for path in paths} | self._state_fingerprint()

    def _state_fingerprint(self) -> dict[Path, Fingerprint | str]:
        state_file = self._targets.state_file
        return {state_file: read_fingerprint(state_file)}

    def _arm_resync(self) -> None:
        self._queue.schedule(RESYNC, at=self._clock() + self._timing.resync_interval)

    def _wait_for_sources(self) -> None:
        waiting = self._sources.waiting_for()
        if waiting != self._last_waiting:
            log.info("waiting for a first good read of %s before reconciling", ", ".join(waiting))
            self._last_waiting = waiting
        self._readiness.update()


def _resolved(path: Path) -> Path:
    """`path` with links followed, as passes key their fingerprints; as given when that is
    impossible (a symlink loop raises RuntimeError on Python 3.11): `read_fingerprint` then
    reports the loop."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return path
