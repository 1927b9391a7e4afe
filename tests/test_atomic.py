"""Atomic, compare-and-swap file replacement."""

import errno
import os
import stat
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem_unittest import Patcher

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
