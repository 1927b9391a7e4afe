"""Regression tests for the bugs the daemon campaigns found (RELIABILITY.md, "Bugs found"), and
the failed-pass Event they asked for. Each names the campaign that found it; the campaign
would find it again, these say it in one screen."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_cri import FakeCri

from node_agent import atomic
from node_agent.atomic import read_snapshot, replace_file
from node_agent.containerd_restart import restart_and_check
from node_agent.daemon.credential_sources import CredentialSources
from node_agent.daemon.outcomes import read_fingerprint
from node_agent.daemon.reporting import (
    RECONCILE_FAILED,
    ROLLED_BACK,
    DaemonReporter,
    EventType,
    Readiness,
)
from node_agent.daemon.run import build_daemon
from node_agent.daemon.work_queue import Batch
from node_agent.daemon.worker import START, PassReport
from node_agent.errors import ConcurrentModification, RestartFailed, WriteFailed
from node_agent.metrics import AgentMetrics
from node_agent.settings import DaemonSettings, RestartCoordination, Settings
from node_agent.status_server import Health


def open_descriptors(directory: Path) -> list[str]:
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            held.append(target)
    return held


# --- I/O faults in the daemon -------------------------------------------------------------------


def test_reading_a_directory_where_a_node_file_should_be_leaves_no_descriptor_open(
    tmp_path: Path,
) -> None:
    """Found by: daemon I/O faults (a tmpfs could not be unmounted: busy). `open(fd)` refuses
    a directory without closing the descriptor it was given; a daemon retrying leaked one per
    pass, until it ran out of descriptors."""
    (tmp_path / "config.toml").mkdir()
    for _ in range(3):
        with pytest.raises(WriteFailed, match="is a directory, expected a file"):
            read_snapshot(tmp_path / "config.toml")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(WriteFailed, match="is a directory"):
        read_snapshot(tmp_path / "link")
    assert open_descriptors(tmp_path) == []


def test_a_node_file_replaced_by_a_directory_during_a_write_makes_the_pass_start_over(
    tmp_path: Path,
) -> None:
    """Found by: daemon I/O faults. The compare-and-swap re-read failed ("cannot re-read: Is a
    directory") and the pass ended with an error and an Event of its own; what stands there
    changed under us: the pass is redone from fresh reads, which name the problem."""
    path = tmp_path / "config.toml"
    path.write_text("version = 2\n")
    snapshot = read_snapshot(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConcurrentModification, match="replaced while we worked"):
        replace_file(snapshot, b"version = 2\n# ours\n")
    assert path.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]  # no temp file left


# --- concurrent writers ---------------------------------------------------------------------------


def replace_with(path: Path, text: str) -> None:
    """Another tool writing `path` the careful way: a temp file renamed over it."""
    temp = path.with_name("other-tool.tmp")
    temp.write_text(text)
    temp.rename(path)


def rewrite_in_place(path: Path, text: str) -> None:
    """Another tool writing `path` in place (truncate, write)."""
    path.write_text(text)


@pytest.mark.parametrize("write", [replace_with, rewrite_in_place])
def test_a_write_landing_between_the_last_check_and_the_rename_is_not_lost(
    write: Callable[[Path, str], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by: concurrent writers (2 of ~10,000 of the other writer's updates lost in a
    minute). The compare-and-swap read the file again just before the rename, but a write
    could land in between and the rename threw it away. The rename is now an exchange whose
    outcome is checked; here the other writer's write lands exactly in that gap."""
    path = tmp_path / "config.json"
    path.write_text("theirs, as we read it\n")
    snapshot = read_snapshot(path)
    check = atomic._check_unchanged

    def check_then_they_write(snapshot: atomic.FileSnapshot) -> None:
        check(snapshot)
        write(path, "theirs, written in the gap\n")

    monkeypatch.setattr(atomic, "_check_unchanged", check_then_they_write)
    with pytest.raises(ConcurrentModification):
        replace_file(snapshot, b"ours, from the stale read\n")
    assert path.read_text() == "theirs, written in the gap\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left


def test_a_file_created_between_the_last_check_and_the_rename_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same gap, for a file the agent creates: someone else created it first."""
    path = tmp_path / "config.json"
    snapshot = read_snapshot(path)
    check = atomic._check_unchanged

    def check_then_they_create(snapshot: atomic.FileSnapshot) -> None:
        check(snapshot)
        replace_with(path, "theirs\n")

    monkeypatch.setattr(atomic, "_check_unchanged", check_then_they_create)
    with pytest.raises(ConcurrentModification):
        replace_file(snapshot, b"ours\n")
    assert path.read_text() == "theirs\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_without_a_writer_in_the_gap_the_write_lands_and_no_temp_file_stays(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.json"
    path.write_text("old\n")
    path.chmod(0o644)
    replace_file(read_snapshot(path), b"new\n")
    assert path.read_text() == "new\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


# --- I/O faults in the daemon (continued) -------------------------------------------------------


def test_the_daemon_never_waits_on_a_fifo_where_a_node_file_should_be(tmp_path: Path) -> None:
    """Found by: daemon I/O faults. The worker's fingerprint of a node file opened a FIFO for
    a blocking read: the worker hung until someone wrote to the FIFO, and removing the FIFO
    did not wake it."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    answers: list[object] = []
    reader = threading.Thread(target=lambda: answers.append(read_fingerprint(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=2)
    if reader.is_alive():  # the bug: release the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_fingerprint waited for a writer on a FIFO")
    (answer,) = answers
    assert isinstance(answer, str) and "not a regular file" in answer


def test_a_symlink_loop_where_a_node_file_should_be_fails_the_pass_cleanly(
    tmp_path: Path,
) -> None:
    """Found by: daemon I/O faults. After the pass failed ("symlink loop"), the worker's
    bookkeeping called `Path.resolve`, which raises RuntimeError on a loop (Python 3.11): no
    error counted, no Event, no retry, a traceback for every file event."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"auths": {"reg.example": {"auth": "dTpw"}}}))
    config_json = tmp_path / "config.json"
    config_json.symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(config_json)
    settings = DaemonSettings(
        node=Settings(
            secret_files=(secret,),
            containerd_config=tmp_path / "config.toml",
            kubelet_config=config_json,
            state_dir=tmp_path / "state",
            restart_mode="none",
        ),
        metrics_address="127.0.0.1:0",
        restarts=RestartCoordination(concurrency=0),
    )
    report = build_daemon(settings).worker.handle(Batch(frozenset({START})))
    assert report is not None and report.result == "error"
    assert report.error is not None and "symlink loop" in report.error


# --- one restart attempt per interval -------------------------------------------------------------


@pytest.fixture
def cri_without_version() -> Iterator[str]:
    """containerd up, its CRI plugin down: Version answers UNIMPLEMENTED."""
    directory = tempfile.mkdtemp(prefix="na-cri-", dir="/tmp")
    fake = FakeCri(os.path.join(directory, "cri.sock"), version=None).start()
    yield fake.socket_path
    fake.stop()
    shutil.rmtree(directory, ignore_errors=True)


class SlowRestart:
    """A restart that takes a little longer every time, like a real one."""

    def __init__(self) -> None:
        self.calls = 0

    def restart(self, *, timeout: float) -> None:
        self.calls += 1
        time.sleep(0.02 * self.calls)


def test_the_cri_timeout_error_reads_the_same_on_every_retry(cri_without_version: str) -> None:
    """Found by: one restart attempt per interval. The error named the seconds left of the
    budget after the restart ("within 0.191181s"), different every time: each retry was a
    new Event (and a new ERROR log line) instead of a count on the first."""
    restarter = SlowRestart()
    messages = []
    for _ in range(2):
        with pytest.raises(RestartFailed) as failure:
            restart_and_check(restarter, socket_path=cri_without_version, timeout=0.3)
        messages.append(str(failure.value))
    assert messages[0] == messages[1]
    assert "did not answer Version within 0.3s" in messages[0]


# --- the failed-pass Event ------------------------------------------------------------------------


class RecordedEvents:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, EventType]] = []

    def record(self, reason: str, message: str, *, type: EventType = "Normal") -> None:
        self.recorded.append((reason, message, type))

    def close(self, timeout: float = 2.0) -> bool:
        return True


def reporter(events: RecordedEvents) -> DaemonReporter:
    readiness = Readiness(Health(), CredentialSources(files=()))
    return DaemonReporter(metrics=AgentMetrics(), events=events, readiness=readiness)


def test_a_failed_pass_is_a_warning_event_with_the_one_line_error_the_same_for_each_retry() -> None:
    events = RecordedEvents()
    error = "/etc/containerd/config.toml: cannot write: No space left on device"
    for _ in range(3):
        reporter(events).pass_done(PassReport(result="error", error=error))
    expected = (
        RECONCILE_FAILED,
        f"reconcile failed: {error}; retrying with backoff",
        "Warning",
    )
    # Identical occurrences: the recorder turns them into one Event with count 3.
    assert events.recorded == [expected] * 3


def test_a_rolled_back_restart_is_reported_once_not_also_as_a_failed_pass() -> None:
    events = RecordedEvents()
    reporter(events).pass_done(
        PassReport(result="error", restart="rolled_back", error="restart failed; restored")
    )
    assert [reason for reason, _, _ in events.recorded] == [ROLLED_BACK]


def test_a_multi_line_error_becomes_one_line_in_the_event() -> None:
    events = RecordedEvents()
    reporter(events).pass_done(PassReport(result="error", error="first line\nsecond line"))
    (_, message, _), *_ = events.recorded
    assert "\n" not in message and "first line second line" in message
