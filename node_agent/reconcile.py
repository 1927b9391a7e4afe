"""The use case: credentials → desired entries → plan and render each node file → write the
files that differ → restart containerd if its auth changed, and prove it came back.

Every file is read, planned and rendered before anything is written, so a broken file or a
bad credential leaves the whole node as it was. Writes are compare-and-swap: if another
writer got in between our read and our rename, the whole pass is redone from fresh reads.

One `Reconciler` per node. `reconcile` returns an `Outcome` that says everything the pass
did: which files it wrote, whether containerd was restarted (and how that went: a rollback
is an outcome, not an exception), and whether containerd is owed a restart it was not
allowed to make (`may_restart=False`: the files that need no restart are written, the ones
that do are only read, and what the agent owns in them is left as it was).
"""

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from node_agent.atomic import (
    HOST_ROOT,
    FileSnapshot,
    read_snapshot,
    remove_stale_temps,
    replace_file,
)
from node_agent.credentials import Credentials
from node_agent.errors import (
    ConcurrentModification,
    RestartFailed,
    UnsupportedConfig,
    WriteFailed,
    unexpected,
)
from node_agent.ownership import AgentState, LastGood, StateStore
from node_agent.plan import Owned, TargetPlan, owned_while_writing, plan_target
from node_agent.targets import FormatError, NodeFileFormat

log = logging.getLogger(__name__)

#: How often a pass is redone when another writer keeps changing a file under us.
MAX_ATTEMPTS = 5

RestartResult = Literal["success", "rolled_back", "failed"]
"""How a pass's containerd restart went (the `result` label of
`node_agent_containerd_restarts_total`): healthy; unhealthy, and healthy again on the
previous config.toml; unhealthy, and the rollback did not help (or there was nothing to
roll back to)."""

Fingerprint = bytes | None
"""sha256 of a file's bytes; None: the file does not exist."""


def fingerprint(content: bytes | None) -> Fingerprint:
    return None if content is None else hashlib.sha256(content).digest()


class ContainerdRestart(Protocol):
    """Restarts containerd and returns once CRI answers; raises RestartFailed otherwise."""

    def restart_and_verify(self) -> None: ...


@dataclass(frozen=True)
class NodeFile:
    """One file the agent manages: its format, where it is, and when a change to it takes
    effect (at once, after a containerd restart, or only when the kubelet next starts)."""

    format: NodeFileFormat
    path: Path
    restarts_containerd: bool = False
    root: Path = HOST_ROOT
    """The host root `path` is under: links are followed inside it."""
    mode: int | None = None
    """The file's mode, whatever it was; None: an existing file keeps its mode (less group
    and other bits), a new one is 0600. Set for the plugin the kubelet executes."""
    read_at_kubelet_start: bool = False
    """The kubelet reads the file only when it starts: a change waits for its next start."""
    keys_are_registries: bool = True
    """The file's entries are registries' credentials (not the plugin, not a provider list)."""

    @property
    def name(self) -> str:
        return self.format.name


@dataclass(frozen=True)
class PreparedFile:
    """A node file read, compared with the desired state, and rendered (nothing written)."""

    node_file: NodeFile
    snapshot: FileSnapshot
    old_text: str | None
    new_text: str | None
    plan: TargetPlan
    desired_count: int

    @property
    def needs_write(self) -> bool:
        return self.new_text is not None and self.new_text != self.old_text

    @property
    def name(self) -> str:
        return self.node_file.name


@dataclass(frozen=True)
class RestartOutcome:
    """The containerd restart a pass made."""

    result: RestartResult
    error: str | None = None
    """Why it was not a success, in one line (no values)."""
    last_attempt_at: float = 0.0
    """Monotonic time of the last restart attempt (a rollback restarts a second time)."""

    @property
    def succeeded(self) -> bool:
        return self.result == "success"


@dataclass(frozen=True)
class Outcome:
    """What a pass found and did."""

    files: tuple[PreparedFile, ...]
    warnings: tuple[str, ...] = ()
    written: tuple[str, ...] = ()
    """The files this pass wrote, by name."""
    restart: RestartOutcome | None = None
    """The containerd restart this pass made, if it made one."""
    restart_owed: bool = False
    """containerd does not run what its file holds (or will hold once written), and this
    pass did not restart it: not allowed to, a dry run or an inspection, or a restart
    pending from an earlier run."""
    dry_run: bool = False
    """Nothing was written: `files` say what a real pass would write."""

    @property
    def changed(self) -> bool:
        return bool(self.written) or self.restart is not None

    @property
    def in_sync(self) -> bool:
        return all(self.in_sync_by_target.values())

    @property
    def in_sync_by_target(self) -> dict[str, bool]:
        """Per file: does it hold the desired state (and, for containerd's, is containerd
        running it)?"""
        containerd_behind = self.restart_owed or self.restart_failed
        return {
            prepared.name: (prepared.name in self.written or not prepared.needs_write)
            and not (prepared.node_file.restarts_containerd and containerd_behind)
            for prepared in self.files
        }

    @property
    def kubelet_restart_needed(self) -> bool:
        """This pass changed a file the kubelet reads only when it starts."""
        return any(
            prepared.node_file.read_at_kubelet_start and prepared.name in self.written
            for prepared in self.files
        )

    @property
    def registries_by_target(self) -> dict[str, int]:
        return {prepared.name: prepared.desired_count for prepared in self.files}

    @property
    def fingerprints(self) -> dict[Path, Fingerprint]:
        """Each file's fingerprint after the pass (a rolled-back file excepted: its content
        is the last good one, read it again)."""
        return {
            prepared.snapshot.path: fingerprint(
                _encode(prepared.new_text)
                if prepared.name in self.written
                else prepared.snapshot.content
            )
            for prepared in self.files
        }

    @property
    def removed(self) -> int:
        """Entries the pass takes out of the files (removed, or given back to their owner)."""
        return sum(
            1
            for prepared in self.files
            for change in prepared.plan.changes
            if change.action in ("remove", "restore")
        )

    @property
    def restart_failed(self) -> bool:
        return self.restart is not None and not self.restart.succeeded


@dataclass
class Reconciler:
    """Brings the node files in line with credentials. Holds no state between passes except
    what `state_store` persists. `containerd` None: containerd is never restarted (its file
    is still written)."""

    node_files: Sequence[NodeFile]
    state_store: StateStore
    containerd: ContainerdRestart | None = None
    dry_run: bool = False
    """`reconcile` only inspects (--dry-run): the one place that decides it."""
    clock: Callable[[], float] = time.monotonic

    @property
    def restarts_containerd(self) -> bool:
        """Whether a pass may restart containerd at all."""
        return self.containerd is not None and any(
            node_file.restarts_containerd for node_file in self.node_files
        )

    def inspect(self, credentials: Credentials) -> Outcome:
        """Read and plan every file without writing anything (for --dry-run and `check`)."""
        state = self.state_store.load()
        outcome = self._inspect(credentials, state)
        owed = self._owed(outcome.files, state)
        return replace(outcome, restart_owed=owed)

    def reconcile(self, credentials: Credentials, *, may_restart: bool = True) -> Outcome:
        """One pass, redone from fresh reads when another writer races us. Without
        `may_restart`, files whose change needs a containerd restart are left as they are."""
        if self.dry_run:
            return replace(self.inspect(credentials), dry_run=True)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return self._reconcile_once(credentials, may_restart=may_restart)
            except ConcurrentModification as conflict:
                log.info("retrying: %s (attempt %d of %d)", conflict, attempt, MAX_ATTEMPTS)
        raise ConcurrentModification(
            f"node files kept changing under us; gave up after {MAX_ATTEMPTS} attempts"
        )

    def _inspect(self, credentials: Credentials, state: AgentState) -> Outcome:
        warnings: list[str] = []
        files = tuple(
            self._prepare(node_file, credentials, state, warnings) for node_file in self.node_files
        )
        return Outcome(files=files, warnings=tuple(warnings))

    def _owed(self, files: Sequence[PreparedFile], state: AgentState) -> bool:
        """Whether containerd does not run what its file holds or should hold."""
        return self.restarts_containerd and (
            state.containerd_restart_pending
            or any(p.needs_write for p in files if p.node_file.restarts_containerd)
        )

    def _reconcile_once(self, credentials: Credentials, *, may_restart: bool) -> Outcome:
        state = self.state_store.load()
        outcome = self._inspect(credentials, state)
        held_back = self.restarts_containerd and not may_restart
        # Held back: containerd's file is only read; the pass is over the other files, and
        # what the agent owns in containerd's file (and a pending restart) stays as it was.
        managed = [
            p for p in outcome.files if not (held_back and p.node_file.restarts_containerd)
        ]
        to_write = [prepared for prepared in managed if prepared.needs_write]
        restart_needed = not held_back and self._owed(to_write, state)
        during = _state_while_writing(
            state,
            managed,
            restart_pending=restart_needed or state.containerd_restart_pending,
            last_good=_last_good_while_writing(state, to_write, restart_needed=restart_needed),
        )
        state_existed = self.state_store.exists()
        if during != state:
            self.state_store.save(during)
        # A killed run can leave a temp file beside a file that needs no write any more.
        for prepared in outcome.files:
            remove_stale_temps(prepared.snapshot.path)
        # Files that need no restart first: they are useful even if containerd then fails.
        try:
            self._write_all_or_nothing(
                sorted(to_write, key=lambda p: p.node_file.restarts_containerd)
            )
        except (WriteFailed, ConcurrentModification):
            if during != state:  # the state goes back to what it was too
                self._restore_state(state, existed=state_existed)
            raise
        written = tuple(p.name for p in to_write)
        restart = self._restart_or_roll_back(to_write, during) if restart_needed else None
        if restart is not None and not restart.succeeded:
            return replace(outcome, written=written, restart=restart)
        # A pass without a restart (held back, --reload none, containerd not managed) leaves
        # an earlier pending restart pending.
        final = _state_after(during, managed, restarted=restart is not None)
        if final != during:
            self.state_store.save(final)
        owed = self._owed(outcome.files, state) if held_back else final.containerd_restart_pending
        return replace(outcome, written=written, restart=restart, restart_owed=owed)

    def _write_all_or_nothing(self, to_write: Sequence[PreparedFile]) -> None:
        """Write every file, or none: when one write fails, the files this pass already wrote
        get their old content back, then the error goes on."""
        done: list[PreparedFile] = []
        try:
            for prepared in to_write:
                replace_file(
                    prepared.snapshot, _encode(prepared.new_text), mode=prepared.node_file.mode
                )
                done.append(prepared)
                log.info(
                    "%s: wrote %s (%s)",
                    prepared.name,
                    prepared.snapshot.path,
                    _describe(prepared.plan),
                )
        except (WriteFailed, ConcurrentModification):
            for prepared in reversed(done):
                _put_back(prepared)
            raise

    def _restore_state(self, state: AgentState, *, existed: bool) -> None:
        if existed:
            self.state_store.save(state)
        else:
            self.state_store.discard()

    def _prepare(
        self, node_file: NodeFile, credentials: Credentials, state: AgentState, warnings: list[str]
    ) -> PreparedFile:
        snapshot = read_snapshot(node_file.path, root=node_file.root)
        old_text = _decode(snapshot)
        try:
            current = node_file.format.entries(old_text)
            desired = node_file.format.desired_entries(credentials, current)
            warnings.extend(f"{node_file.name}: {skipped}" for skipped in desired.skipped)
            plan = plan_target(
                current=current, desired=desired.entries, owned=state.owned_in(node_file.name)
            )
            new_text = _rendered(node_file.format, old_text, plan)
        except FormatError as error:
            raise UnsupportedConfig(str(node_file.path), str(error)) from None
        except Exception as error:
            doing = f"editing the {node_file.name} file {node_file.path}"
            raise unexpected(error, doing=doing) from None
        prepared = PreparedFile(node_file, snapshot, old_text, new_text, plan, desired.registries)
        if prepared.needs_write:
            _check_directory(snapshot.path.parent)
        return prepared

    def _restart_or_roll_back(
        self, written: Sequence[PreparedFile], during: AgentState
    ) -> RestartOutcome:
        assert self.containerd is not None
        started = self.clock()
        try:
            self.containerd.restart_and_verify()
            log.info("containerd restarted and answered CRI")
            return RestartOutcome("success", last_attempt_at=started)
        except RestartFailed as failure:
            restart_error = str(failure)
        # What containerd last ran, kept in the state since before the write: also when that
        # write was made by an earlier run, killed before its restart or its rollback.
        last_good = during.containerd_last_good or _last_good_while_writing(
            AgentState(), written, restart_needed=True
        )
        if last_good is None:
            return RestartOutcome("failed", restart_error, last_attempt_at=started)
        root = next((f.root for f in self.node_files if f.restarts_containerd), HOST_ROOT)
        _roll_back(last_good, root=root)
        second = self.clock()
        try:
            self.containerd.restart_and_verify()
        except RestartFailed as failure:
            error = f"{restart_error}; config rolled back, but containerd still failed: {failure}"
            return RestartOutcome("failed", error, last_attempt_at=second)
        self.state_store.save(
            replace(during, containerd_restart_pending=False, containerd_last_good=None)
        )
        error = f"{restart_error}; previous config.toml restored and containerd restarted healthy"
        return RestartOutcome("rolled_back", error, last_attempt_at=second)


def _rendered(file_format: NodeFileFormat, old_text: str | None, plan: TargetPlan) -> str | None:
    """The file's text after the plan. An existing file is always rendered (a file the agent
    writes whole brings its own settings up to date then); a missing one only when an entry
    goes into it."""
    if old_text is None and not plan.updates:
        return None
    return file_format.render(old_text, plan.updates)


def _check_directory(directory: Path) -> None:
    """A file is written by a rename in its directory: it must be there, before anything is
    written (a dry run, too, fails where the real run would)."""
    if not directory.is_dir():
        raise WriteFailed(f"{directory}: directory does not exist (wrong path or --host-root?)")


def _put_back(prepared: PreparedFile) -> None:
    """The file as this pass found it, in place of what the pass wrote (if that is still
    what is there: someone else's newer write stays)."""
    path = prepared.snapshot.path
    current = read_snapshot(path, root=prepared.node_file.root)
    if current.content != _encode(prepared.new_text):
        return
    if prepared.snapshot.content is None:
        path.unlink(missing_ok=True)
    else:
        replace_file(current, prepared.snapshot.content)
    log.warning("%s: put back as it was (a later write of this pass failed)", path)


def _roll_back(last_good: LastGood, *, root: Path) -> None:
    path = Path(last_good.path)
    if last_good.text is None:
        # We created the file: rolling back means it is gone again.
        path.unlink(missing_ok=True)
    else:
        current = read_snapshot(path, root=root)
        if current.content != _encode(last_good.text):
            replace_file(current, _encode(last_good.text))
    log.warning("containerd: rolled back %s", path)


def _last_good_while_writing(
    state: AgentState, to_write: Sequence[PreparedFile], *, restart_needed: bool
) -> LastGood | None:
    """config.toml as containerd runs it, to roll back to if the coming restart fails."""
    if state.containerd_restart_pending:
        # The file on disk was never confirmed by a restart: keep what was.
        return state.containerd_last_good
    written = next((p for p in to_write if p.node_file.restarts_containerd), None)
    if written is None or not restart_needed:
        return None
    return LastGood(str(written.snapshot.path), written.old_text)


def _state_while_writing(
    state: AgentState,
    files: Sequence[PreparedFile],
    *,
    restart_pending: bool,
    last_good: LastGood | None,
) -> AgentState:
    owned = dict(state.owned)
    for prepared in files:
        name = prepared.node_file.name
        owned[name] = owned_while_writing(state.owned_in(name), prepared.plan.owned_after)
    return AgentState(
        owned=_drop_empty(owned),
        containerd_restart_pending=restart_pending,
        containerd_last_good=last_good,
    )


def _state_after(
    during: AgentState, files: Sequence[PreparedFile], *, restarted: bool
) -> AgentState:
    # Targets not managed in this pass (--targets) keep what they own.
    owned = {**during.owned, **{p.node_file.name: p.plan.owned_after for p in files}}
    pending = during.containerd_restart_pending and not restarted
    return AgentState(
        owned=_drop_empty(owned),
        containerd_restart_pending=pending,
        containerd_last_good=during.containerd_last_good if pending else None,
    )


def _drop_empty(owned: dict[str, Owned]) -> dict[str, Owned]:
    return {name: keys for name, keys in owned.items() if keys}


def _decode(snapshot: FileSnapshot) -> str | None:
    if snapshot.content is None:
        return None
    try:
        return snapshot.content.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedConfig(str(snapshot.path), "not UTF-8 text; refusing to edit") from None


def _encode(text: str | None) -> bytes:
    assert text is not None
    return text.encode("utf-8")


def _describe(plan: TargetPlan) -> str:
    return (
        ", ".join(f"{change.action} {change.key}" for change in plan.changes) or "no entry change"
    )
