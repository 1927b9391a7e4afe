"""Atomic, compare-and-swap file replacement."""

import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem_unittest import Patcher

from node_agent import atomic
from node_agent.atomic import read_snapshot, remove_stale_temps, replace_file, write_new_file
from node_agent.errors import ConcurrentModification, WriteFailed


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_text("old")
    replace_file(read_snapshot(target), b"new")
    assert target.read_text() == "new"
    assert leftovers(tmp_path) == []


def test_creates_a_missing_file_with_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    snapshot = read_snapshot(target)
    assert not snapshot.exists
    replace_file(snapshot, b"{}")
    assert mode_of(target) == 0o600


def test_keeps_owner_bits_and_drops_group_and_other_permissions(tmp_path: Path) -> None:
    # The file holds credentials once we write it: a world-readable mode would leak them.
    target = tmp_path / "config.toml"
    target.write_text("old")
    target.chmod(0o644)
    replace_file(read_snapshot(target), b"new")
    assert mode_of(target) == 0o600


def test_keeps_the_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    target = tmp_path / "config.toml"
    target.write_text("old")
    os.chown(target, 1234, 5678)
    replace_file(read_snapshot(target), b"new")
    assert (target.stat().st_uid, target.stat().st_gid) == (1234, 5678)


def test_a_concurrent_edit_is_detected_and_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    target.write_text("ours")
    snapshot = read_snapshot(target)
    target.write_text("theirs")
    with pytest.raises(ConcurrentModification):
        replace_file(snapshot, b"new")
    assert target.read_text() == "theirs"
    assert leftovers(tmp_path) == []


def test_a_file_created_by_someone_else_meanwhile_is_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    snapshot = read_snapshot(target)
    target.write_text("theirs")
    with pytest.raises(ConcurrentModification):
        replace_file(snapshot, b"new")
    assert target.read_text() == "theirs"


def test_a_symlinked_target_is_followed_and_the_link_kept(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text("old")
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    replace_file(read_snapshot(link), b"new")
    assert link.is_symlink()
    assert real.read_text() == "new"


def test_a_directory_where_the_file_should_be_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").mkdir()
    with pytest.raises(WriteFailed, match="is a directory"):
        read_snapshot(tmp_path / "config.toml")


def test_a_read_only_directory_fails_cleanly_and_keeps_the_old_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    target = tmp_path / "config.toml"
    target.write_text("old")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WriteFailed, match="cannot create temp file"):
            replace_file(read_snapshot(target), b"new")
    finally:
        tmp_path.chmod(0o700)
    assert target.read_text() == "old"


def test_disk_full_fails_cleanly_keeps_the_old_file_and_removes_the_temp() -> None:
    with Patcher() as patcher:
        assert patcher.fs is not None
        patcher.fs.set_disk_usage(100, "/")
        directory = Path("/etc/containerd")
        directory.mkdir(parents=True)
        target = directory / "config.toml"
        target.write_text("old")
        with pytest.raises(WriteFailed) as caught:
            replace_file(read_snapshot(target), b"x" * 1000)
        assert os.strerror(errno.ENOSPC) in str(caught.value)
        assert target.read_text() == "old"
        assert leftovers(directory) == []


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    (tmp_path / ".config.toml.node-agent-99999.tmp").write_text("half")
    (tmp_path / "unrelated.tmp").write_text("keep")
    remove_stale_temps(target)
    assert leftovers(tmp_path) == ["unrelated.tmp"]


def test_state_files_are_written_whatever_was_there(tmp_path: Path) -> None:
    path = tmp_path / "owned.json"
    path.write_text("old")
    write_new_file(path, b"new")
    assert path.read_text() == "new"
    assert mode_of(path) == 0o600


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "absent" / "config.json"
    with pytest.raises(WriteFailed, match="directory does not exist"):
        replace_file(read_snapshot(target), b"{}")


# --- what stands where a node file should be -----------------------------------------------


def test_reading_a_fifo_where_a_node_file_should_be_does_not_wait_for_a_writer(
    tmp_path: Path,
) -> None:
    """Found by: I/O faults (RELIABILITY.md, "Bugs found")."""
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    errors: list[Exception] = []

    def read() -> None:
        try:
            read_snapshot(fifo)
        except WriteFailed as error:
            errors.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck reader go
        pytest.fail("read_snapshot blocked on a FIFO")
    assert "not a regular file" in str(errors[0])


def test_a_symlink_loop_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """Found by: I/O faults (RELIABILITY.md, "Bugs found")."""
    (tmp_path / "config.toml").symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(tmp_path / "config.toml")
    with pytest.raises(WriteFailed, match="symlink loop"):
        read_snapshot(tmp_path / "config.toml")


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


# --- a write landing between the last check and the rename ---------------------------------


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
