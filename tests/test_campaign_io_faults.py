"""I/O faults (RELIABILITY.md): what `node-agent reconcile` does when the disk is full,
a directory is read-only, permission is denied, or a node file is a symlink, a directory or
a FIFO.

Every fault that stops the agent must give one clear error line naming the file (exit 1, no
traceback), leave the file it could not write byte-for-byte as it was, leave no temp file
behind, and never half-write anything: a file that did change is a complete new version.
Once the fault is gone, the next run converges.

Decided and documented (docs/reliability.md "How files are written"): a symlinked node file
is followed (inside the host root) and the link kept; a symlink loop, a link to nothing, a
directory or a FIFO where a node file should be is refused.

Real faults need root (a 64 KiB tmpfs, a read-only bind mount, `chattr +i`, `capsh` to drop
CAP_DAC_OVERRIDE); without root those cases skip, and pyfakefs and injected `OSError`s
cover disk full and I/O errors anywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from campaign import CliRun, campaign, run_cli
from leak_audit import CANARY_PASSWORD, CANARY_TOKEN, CANARY_USERNAME, LeakAudit
from pyfakefs.fake_filesystem_unittest import Patcher
from support.agent import agent_process_env
from support.node import CRI, FOREIGN_JSON, FOREIGN_TOML, NodeTree

REG = "reg.example:5000"
CAMPAIGN = "I/O faults"
COMMAND = "pytest tests/test_campaign_io_faults.py (as root for the real faults)"

pytestmark = pytest.mark.usefixtures("leak_audit")


def needs_root(why: str) -> None:
    """Skip, saying so, unless this runs as root: `why` names what needs it."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


@pytest.fixture
def node(tmp_path: Path, leak_audit: LeakAudit) -> NodeTree:
    """Foreign files, a Secret with the canary credential for reg.example:5000."""
    node = NodeTree.create(tmp_path / "node")
    node.write_secret({REG: {"username": CANARY_USERNAME, "password": CANARY_PASSWORD}})
    leak_audit.allow(node.secret)
    leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
    return node


@pytest.fixture
def fault(record_property: Any) -> Iterator[Any]:
    """Counts the test as one case of the campaign (a failed test is a failure)."""
    with campaign(record_property, CAMPAIGN, command=COMMAND) as tally:
        tally.cases = 1
        yield tally


def reconcile(audit: LeakAudit, node: NodeTree) -> CliRun:
    return run_cli(audit, ["reconcile", *node.flags("--reload", "none", "--log-level", "debug")])


@contextmanager
def mounted(*command: str, target: Path) -> Iterator[None]:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot {' '.join(command[:3])}: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


@contextmanager
def tmpfs(directory: Path, *, size: str = "64k") -> Iterator[None]:
    needs_root("a full disk is a small tmpfs mounted over the directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with mounted(
        "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory), target=directory
    ):
        yield


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    needs_root("a read-only directory is a read-only bind mount over it")
    with mounted("mount", "--bind", str(directory), str(directory), target=directory):
        remount = ["mount", "-o", "remount,bind,ro", str(directory), str(directory)]
        subprocess.run(remount, check=True, capture_output=True)
        yield


def fill(directory: Path) -> None:
    """Fill the filesystem of `directory` up to the last byte."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as error:
                    assert error.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def assert_refused(
    run: CliRun,
    node: NodeTree,
    before: dict[str, bytes | None],
    *,
    unchanged: tuple[str, ...] = ("config.toml", "config.json", "owned.json"),
    mentions: str,
) -> None:
    """A clean refusal: exit 1, one error line naming the problem, `unchanged` files exactly
    as before, every other file complete, no temp file."""
    assert run.code == 1, run.err
    assert "Traceback" not in run.err
    assert len(run.error_lines) == 1, run.err
    assert mentions in run.error_lines[0]
    after = node.contents()
    for name in unchanged:
        assert after[name] == before[name], f"{name} changed"
    _assert_complete(before, after)
    assert node.temp_files() == []


def _assert_complete(before: dict[str, bytes | None], after: dict[str, bytes | None]) -> None:
    """Every file that changed is a complete new version: nothing is half-written."""
    for name, content in after.items():
        if content is None or content == before[name]:
            continue
        if name.endswith(".toml"):
            tomllib.loads(content.decode())
        else:
            json.loads(content)


def assert_converged(audit: LeakAudit, node: NodeTree) -> None:
    run = reconcile(audit, node)
    assert run.code == 0, run.err
    toml = tomllib.loads(node.config_toml.read_text())
    assert toml["plugins"][CRI]["registry"]["configs"][REG]["auth"]["password"] == CANARY_PASSWORD
    assert CANARY_TOKEN in node.config_json.read_text()
    assert node.temp_files() == []


# --- disk full --------------------------------------------------------------------------------


def test_disk_full_under_config_toml_keeps_it_and_names_it(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    directory = node.config_toml.parent
    shutil.rmtree(directory)
    with tmpfs(directory):
        directory.joinpath("config.toml").write_text(FOREIGN_TOML)
        fill(directory)
        before = node.contents()
        run = reconcile(leak_audit, node)
        # config.json (another filesystem) is written first, complete; config.toml is not.
        assert_refused(
            run, node, before, unchanged=("config.toml",), mentions="No space left on device"
        )
        assert "config.toml" in run.error_lines[0]
        (directory / "filler").unlink()
        assert_converged(leak_audit, node)


def test_disk_full_under_the_state_dir_changes_no_node_file(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    with tmpfs(node.state_dir):
        node.state_dir.chmod(0o700)
        fill(node.state_dir)
        before = node.contents()
        run = reconcile(leak_audit, node)
        assert_refused(run, node, before, mentions="No space left on device")
        assert "owned.json" in run.error_lines[0]
        (node.state_dir / "filler").unlink()
        assert_converged(leak_audit, node)


def test_disk_full_under_config_json_keeps_both_files(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    directory = node.config_json.parent
    shutil.rmtree(directory)
    with tmpfs(directory):
        directory.joinpath("config.json").write_text(FOREIGN_JSON)
        fill(directory)
        before = node.contents()
        run = reconcile(leak_audit, node)
        # config.json is written before config.toml: its failure stops the pass.
        assert_refused(
            run,
            node,
            before,
            unchanged=("config.toml", "config.json"),
            mentions="No space left on device",
        )
        (directory / "filler").unlink()
        assert_converged(leak_audit, node)


#: Which files a failure writing into each directory leaves untouched: config.json is written
#: before config.toml, and the state before both.
UNTOUCHED_WHEN_FULL = {
    "etc/containerd": ("config.toml",),
    "var/lib/kubelet": ("config.toml", "config.json"),
    "var/lib/node-agent": ("config.toml", "config.json", "owned.json"),
}


@pytest.mark.parametrize("full", list(UNTOUCHED_WHEN_FULL))
def test_disk_full_in_a_fake_filesystem_is_a_clean_refusal(
    full: str, leak_audit: LeakAudit, fault: Any
) -> None:
    """pyfakefs: each directory in turn on its own device with 100 bytes free (no root)."""
    with Patcher() as patcher:
        assert patcher.fs is not None
        existing = {"etc/containerd": FOREIGN_TOML, "var/lib/kubelet": FOREIGN_JSON}
        device = Path("/node") / full
        patcher.fs.add_mount_point(str(device), total_size=len(existing.get(full, "")) + 100)
        node = NodeTree.create(Path("/node"))
        node.write_secret({REG: {"username": CANARY_USERNAME, "password": CANARY_PASSWORD}})
        before = node.contents()
        run = reconcile(leak_audit, node)
        assert_refused(
            run,
            node,
            before,
            unchanged=UNTOUCHED_WHEN_FULL[full],
            mentions=os.strerror(errno.ENOSPC),
        )
        patcher.fs.set_disk_usage(10 * 1024 * 1024, str(device))
        assert_converged(leak_audit, node)


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("victim", ["config.toml", "config.json", "owned.json"])
def test_an_error_reported_only_by_fsync_keeps_the_old_file(
    victim: str,
    error: int,
    node: NodeTree,
    leak_audit: LeakAudit,
    fault: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Delayed allocation (ext4, NFS) can accept every write() and fail only at fsync()."""
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if _names(fd).startswith(f"{victim}.node-agent-", _names(fd).rfind("/.") + 2):
            raise OSError(error, os.strerror(error))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    before = node.contents()
    run = reconcile(leak_audit, node)
    directory = {"config.toml": "etc/containerd", "config.json": "var/lib/kubelet"}
    unchanged = UNTOUCHED_WHEN_FULL[directory.get(victim, "var/lib/node-agent")]
    assert_refused(run, node, before, unchanged=unchanged, mentions=os.strerror(error))
    assert victim in run.error_lines[0]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert_converged(leak_audit, node)


def _names(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --- read-only and permission denied ----------------------------------------------------------


def test_a_read_only_config_dir_is_a_clean_refusal(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    before = node.contents()
    with read_only(node.config_toml.parent):
        run = reconcile(leak_audit, node)
        assert_refused(
            run, node, before, unchanged=("config.toml",), mentions="Read-only file system"
        )
    assert_converged(leak_audit, node)


def test_a_read_only_state_dir_changes_no_node_file(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    node.state_dir.mkdir(mode=0o700)
    before = node.contents()
    with read_only(node.state_dir):
        run = reconcile(leak_audit, node)
        assert_refused(run, node, before, mentions="Read-only file system")
    assert_converged(leak_audit, node)


def test_an_immutable_kubelet_dir_is_a_clean_refusal(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    needs_root("chattr +i takes CAP_LINUX_IMMUTABLE")
    directory = node.config_json.parent
    if subprocess.run(["chattr", "+i", str(directory)], check=False).returncode != 0:
        pytest.skip("chattr +i not supported here")
    try:
        before = node.contents()
        run = reconcile(leak_audit, node)
        assert_refused(
            run,
            node,
            before,
            unchanged=("config.toml", "config.json"),
            mentions="Operation not permitted",
        )
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
    assert_converged(leak_audit, node)


def without_dac_override(audit: LeakAudit, node: NodeTree) -> CliRun:
    """The agent as a child that is root but may not bypass file permissions (capsh drops
    CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER); as non-root, as ourselves."""
    argv = ["reconcile", *node.flags("--reload", "none")]
    if os.geteuid() != 0:
        return run_cli(audit, argv)
    if shutil.which("capsh") is None:
        # Root passes every permission check; capsh runs the agent without that power.
        pytest.skip("capsh (libcap2-bin) not installed: as root, permission faults need it")
    inner = shlex.join([sys.executable, "-m", "node_agent", *argv])
    result = subprocess.run(
        ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c", inner],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=agent_process_env(),
    )
    audit.check_text(result.stdout + result.stderr, "agent output")
    return CliRun(result.returncode, result.stdout, result.stderr)


def owned_by_someone_else(path: Path, mode: int) -> None:
    """`path` no longer ours: another owner (as root) or no permission at all (non-root)."""
    if os.geteuid() == 0:
        os.chown(path, 4321, 4321)
        path.chmod(mode)
    else:
        path.chmod(0o555 if path.is_dir() else 0)


def test_a_config_dir_we_may_not_write_is_a_clean_refusal(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    directory = node.config_toml.parent
    owned_by_someone_else(directory, 0o755)
    try:
        before = node.contents()
        run = without_dac_override(leak_audit, node)
        assert_refused(run, node, before, unchanged=("config.toml",), mentions="Permission denied")
        assert "cannot create temp file" in run.error_lines[0]
    finally:
        os.chown(directory, os.geteuid(), os.getegid())
        directory.chmod(0o755)
    assert_converged(leak_audit, node)


def test_a_config_file_we_may_not_read_is_a_clean_refusal(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    owned_by_someone_else(node.config_json, 0o600)
    try:
        before = node.contents()
        run = without_dac_override(leak_audit, node)
        assert_refused(run, node, before, mentions="Permission denied")
        assert "cannot read" in run.error_lines[0]
    finally:
        os.chown(node.config_json, os.geteuid(), os.getegid())
        node.config_json.chmod(0o600)
    assert_converged(leak_audit, node)


# --- what stands where a node file should be ---------------------------------------------------


def test_a_symlinked_config_toml_is_followed_and_the_link_kept(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    real = node.root / "image/config.toml"
    real.parent.mkdir()
    node.config_toml.rename(real)
    node.config_toml.symlink_to(Path("../../image/config.toml"))
    real.chmod(0o644)
    leak_audit.guard_node(files=[real])
    assert reconcile(leak_audit, node).code == 0
    assert node.config_toml.is_symlink()
    assert REG in tomllib.loads(real.read_text())["plugins"][CRI]["registry"]["configs"]
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert node.temp_files() == []


def test_a_dangling_symlink_is_refused_and_nothing_is_created_where_it_points(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    real = node.root / "image/config.json"
    real.parent.mkdir()
    node.config_json.unlink()
    node.config_json.symlink_to(real)
    leak_audit.guard_node(files=[real])
    before = node.contents()
    run = reconcile(leak_audit, node)
    assert run.code == 1
    assert run.error_lines == [
        f"node-agent: error: {node.config_json}: dangling symlink ({node.config_json} points "
        f"to {real}, which does not exist); fix or remove the link"
    ]
    assert node.config_json.is_symlink() and not real.exists()
    assert node.contents() == before


def symlink_loop(path: Path) -> None:
    path.symlink_to(path.with_name("loop"))
    path.with_name("loop").symlink_to(path)


TARGET_REPLACEMENTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "a directory": (Path.mkdir, "is a directory, expected a file"),
    "a FIFO": (os.mkfifo, "not a regular file"),
    "a symlink loop": (symlink_loop, "symlink loop"),
    "a symlink to a directory": (
        lambda path: path.symlink_to(path.parent),
        "is a directory, expected a file",
    ),
    "a symlink into a missing directory": (
        lambda path: path.symlink_to(path.parent / "missing/config"),
        "dangling symlink",
    ),
    "a symlink to /dev/null": (lambda path: path.symlink_to("/dev/null"), "not a regular file"),
}


@pytest.mark.parametrize("target", ["config.toml", "config.json"])
@pytest.mark.parametrize("replacement", list(TARGET_REPLACEMENTS))
def test_something_else_where_a_node_file_should_be_is_refused_without_waiting(
    replacement: str, target: str, node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    """Run as a child with a timeout: a FIFO once made the agent wait for a writer forever."""
    path = node.config_toml if target == "config.toml" else node.config_json
    path.unlink()
    make, message = TARGET_REPLACEMENTS[replacement]
    make(path)
    # Found when reading, before anything is written.
    unchanged: tuple[str, ...] = ("config.toml", "config.json", "owned.json")
    before = node.contents()
    result = subprocess.run(
        [sys.executable, "-m", "node_agent", "reconcile", *node.flags("--reload", "none")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=agent_process_env(),
    )
    leak_audit.check_text(result.stdout + result.stderr, "agent output")
    run = CliRun(result.returncode, result.stdout, result.stderr)
    assert_refused(run, node, before, unchanged=unchanged, mentions=message)
    # The path named is the node file's (for a link to nothing: the link and where it points).
    assert f"{target}: " in run.error_lines[0]
    if "missing" in replacement:
        assert "/missing/config, which does not exist" in run.error_lines[0]


def test_a_state_dir_that_is_a_file_is_a_clean_refusal(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    node.state_dir.parent.mkdir(parents=True, exist_ok=True)
    node.state_dir.write_text("not a directory")
    before = node.contents()
    run = reconcile(leak_audit, node)
    assert run.code == 1 and len(run.error_lines) == 1, run.err
    assert "node-agent" in run.error_lines[0]
    assert node.contents() == before
    assert node.state_dir.read_text() == "not a directory"


def test_an_unreadable_state_file_stops_before_any_write(
    node: NodeTree, leak_audit: LeakAudit, fault: Any
) -> None:
    node.state_dir.mkdir(mode=0o700)
    (node.state_dir / "owned.json").write_text('{"version": 1, "owned": [')
    (node.state_dir / "owned.json").chmod(0o600)
    before = node.contents()
    run = reconcile(leak_audit, node)
    assert_refused(run, node, before, mentions="state file is not valid JSON")
