"""I/O faults in the daemon (RELIABILITY.md): what `node-agent run` does when a pass
cannot write a node file: a full disk, a read-only or immutable directory, permission denied,
a directory, a FIFO or an odd symlink where a node file should be, an I/O error at fsync.

For each fault, while the daemon runs and the Secret changes: a clear error (one ERROR line
naming the file and the cause, no traceback; a retry failing the same way logs at debug),
every file that could not be written byte-for-byte as it was (and whatever odd thing stood
there left alone), every file that did change complete, `node_agent_reconcile_total{result=
"error"}` counting each failed pass, `node_agent_in_sync` 0 for each target left behind, and
one Warning Event `RegistryCredentialsReconcileFailed` with the one-line error whose count
grows with the retries (no new Event per retry). Once the fault is cleared the daemon
converges by itself: both files hold the new version, in sync, no temp file.

The daemon runs in this process (timings compressed 100x, so retries come within
milliseconds), except for permission denied: as root that needs the agent in a child without
CAP_DAC_OVERRIDE (`capsh`), `node-agent run` with its real retry timing and
`--resync-interval 1s`. Real faults need root (64 KiB tmpfs mounts, bind mounts, chattr,
capsh); without root those cases skip and the others still run. Symlinks, as documented in
docs/reliability.md "How files are written": a symlinked node file is followed (inside the
host root) and the link kept; a link to nothing (into a missing directory too), a loop, a
link to a directory or to /dev/null is refused.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import random
import shutil
import stat
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from campaign import (
    SecretVersions,
    agent_passwords,
    campaign,
    campaign_seed,
    campaign_size,
    fill_filesystem,
)
from kubeapi import KubeApiServer
from leak_audit import LeakAudit
from support.agent import Agent, AgentProcess, running_in_process
from support.node import FOREIGN_JSON, NodeTree
from support.settings import TimeScale, daemon_argv, scaled_settings
from support.waiting import wait_until

CAMPAIGN = "daemon: I/O faults"
COMMAND = "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_daemon_io_faults.py (root)"
FAILED_EVENT = "RegistryCredentialsReconcileFailed"
FAST = TimeScale(100)
IS_ROOT = os.geteuid() == 0

pytestmark = pytest.mark.usefixtures("leak_audit")

Clear = Callable[[], None]


@dataclass(frozen=True)
class Fault:
    """One way a pass cannot write. `inject` breaks the node and returns what clears it."""

    name: str
    inject: Callable[[NodeTree], Clear]
    cause: str
    """In the error: the cause as the kernel or the agent words it."""
    names: str
    """In the error: the file or directory it names."""
    untouched: tuple[str, ...]
    """What the pass must leave byte-for-byte as it was (`NodeTree.contents` names)."""
    needs_root: str | None = None
    """Why injecting it needs root (None: it does not)."""


# --- the faults --------------------------------------------------------------------------------

#: Which files a failure writing into each directory leaves untouched: the state is saved
#: first, then config.json, then config.toml.
UNTOUCHED_BY_DIR = {
    "etc/containerd": ("config.toml",),
    "var/lib/kubelet": ("config.toml", "config.json"),
    "var/lib/node-agent": ("config.toml", "config.json", "owned.json"),
}
NAMED_BY_DIR = {
    "etc/containerd": "config.toml",
    "var/lib/kubelet": "config.json",
    "var/lib/node-agent": "var/lib/node-agent",  # the dir (its mode is set) or owned.json
}


def disk_full(directory: str) -> Fault:
    def inject(node: NodeTree) -> Clear:
        fill_filesystem(node.root / directory)
        return (node.root / directory / "filler").unlink

    return Fault(
        f"disk full under {directory}",
        inject,
        os.strerror(errno.ENOSPC),
        NAMED_BY_DIR[directory],
        UNTOUCHED_BY_DIR[directory],
        needs_root="a full disk is a small tmpfs mounted over the directory",
    )


def read_only(directory: str) -> Fault:
    def inject(node: NodeTree) -> Clear:
        path = str(node.root / directory)
        run("mount", "--bind", path, path)
        run("mount", "-o", "remount,bind,ro", path, path)
        return lambda: run("umount", path)

    return Fault(
        f"read-only {directory}",
        inject,
        os.strerror(errno.EROFS),
        NAMED_BY_DIR[directory],
        UNTOUCHED_BY_DIR[directory],
        needs_root="a read-only directory is a read-only bind mount over it",
    )


def immutable(directory: str) -> Fault:
    def inject(node: NodeTree) -> Clear:
        path = str(node.root / directory)
        run("chattr", "+i", path)
        return lambda: run("chattr", "-i", path)

    return Fault(
        f"immutable {directory} (chattr +i)",
        inject,
        os.strerror(errno.EPERM),
        NAMED_BY_DIR[directory],
        UNTOUCHED_BY_DIR[directory],
        needs_root="chattr +i takes CAP_LINUX_IMMUTABLE",
    )


def fsync_error(victim: str, code: int) -> Fault:
    """The disk accepts every write() and fails at fsync() of the temp file (delayed
    allocation, NFS): injected into this process's `os.fsync`, the product's own call."""

    def inject(node: NodeTree) -> Clear:
        real_fsync = os.fsync

        def failing_fsync(fd: int) -> None:
            if f"/.{victim}.node-agent-" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(code, os.strerror(code))
            real_fsync(fd)

        patch = mock.patch.object(os, "fsync", failing_fsync)
        patch.start()
        return patch.stop

    directory = {"config.toml": "etc/containerd", "config.json": "var/lib/kubelet"}[victim]
    return Fault(
        f"{errno.errorcode[code]} at fsync of {victim}",
        inject,
        os.strerror(code),
        victim,
        UNTOUCHED_BY_DIR[directory],
    )


def replaced(
    target: str,
    what: str,
    make: Callable[[Path], None],
    cause: str,
) -> Fault:
    """Something else where a node file should be; clearing puts the old file back."""

    def inject(node: NodeTree) -> Clear:
        path = node.config_toml if target == "config.toml" else node.config_json
        old = path.read_bytes()
        put_in_place(path, make)

        def clear() -> None:
            put_in_place(path, lambda temp: write_private(temp, old))
            path.with_name("loop").unlink(missing_ok=True)

        return clear

    untouched: tuple[str, ...] = ("config.toml", "config.json", "owned.json")
    return Fault(f"{target}: {what}", inject, cause, target, untouched)


def put_in_place(path: Path, make: Callable[[Path], object]) -> None:
    """Replace `path` with what `make` creates, as another tool would: made beside it and
    renamed over it (a directory cannot be renamed over a file: the file is removed first,
    again if the agent re-created it meanwhile)."""
    temp = path.with_name(path.name + ".campaign")
    make(temp)
    while True:
        try:
            os.rename(temp, path)
            return
        except (IsADirectoryError, NotADirectoryError, FileExistsError, OSError) as error:
            if error.errno not in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY):
                raise
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()


def write_private(path: Path, content: bytes) -> None:
    """As the agent left it: it holds credentials, so 0600."""
    path.write_bytes(content)
    path.chmod(0o600)


def symlink_loop(path: Path) -> None:
    """`path` → `loop` → `config.*` (the name `path` will be renamed to)."""
    final = path.with_name(path.name.removesuffix(".campaign"))
    path.symlink_to(final.with_name("loop"))
    final.with_name("loop").symlink_to(final)


FAULTS = [
    *(disk_full(d) for d in UNTOUCHED_BY_DIR),
    read_only("etc/containerd"),
    read_only("var/lib/node-agent"),
    immutable("var/lib/kubelet"),
    fsync_error("config.toml", errno.EIO),
    fsync_error("config.json", errno.ENOSPC),
    replaced("config.toml", "a directory", Path.mkdir, "is a directory, expected a file"),
    replaced("config.json", "a directory", Path.mkdir, "is a directory, expected a file"),
    replaced("config.toml", "a FIFO", os.mkfifo, "not a regular file"),
    replaced("config.json", "a symlink loop", symlink_loop, "symlink loop"),
    replaced(
        "config.toml",
        "a symlink to a directory",
        lambda path: path.symlink_to(path.parent),
        "is a directory, expected a file",
    ),
    replaced(
        "config.json",
        "a symlink into a missing directory",
        lambda path: path.symlink_to(path.parent / "missing/config.json"),
        "dangling symlink",
    ),
    replaced(
        "config.toml",
        "a symlink to /dev/null",
        lambda path: path.symlink_to("/dev/null"),
        "not a regular file",
    ),
]


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


# --- the node ----------------------------------------------------------------------------------


@pytest.fixture
def node(
    tmp_path: Path, leak_audit: LeakAudit, caplog: pytest.LogCaptureFixture
) -> Iterator[NodeTree]:
    """Foreign files; as root each of the three directories is a 64 KiB tmpfs of its own,
    mounted before the daemon starts watching (so disk-full faults are real)."""
    caplog.set_level(logging.DEBUG, logger="node_agent")
    root = tmp_path / "node"
    directories = [root / d for d in UNTOUCHED_BY_DIR]
    mounted: list[Path] = []
    for directory in directories:
        directory.mkdir(parents=True, mode=0o700)
        if IS_ROOT:
            mode = "0700" if directory.name == "node-agent" else "0755"
            run("mount", "-t", "tmpfs", "-o", f"size=64k,mode={mode}", "tmpfs", str(directory))
            mounted.append(directory)
    try:
        node = NodeTree.create(root)
        leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
        yield node
        # The audit looks at the node files before their filesystems go away.
        leak_audit.check_tree(root)
        leak_audit.check_modes()
    finally:
        for directory in mounted:
            subprocess.run(["chattr", "-i", str(directory)], check=False, capture_output=True)
            unmount(directory)


def unmount(directory: Path) -> None:
    """Every mount on `directory` (a bind mount of a failed case may sit on the tmpfs)."""
    for _ in range(50):
        result = subprocess.run(
            ["umount", str(directory)], check=False, capture_output=True, text=True
        )
        if result.returncode != 0 and "not mounted" in result.stderr:
            return
        if result.returncode != 0:
            time.sleep(0.1)  # busy: a thread of a daemon that is stopping
    holders = subprocess.run(
        f"ls -l /proc/{os.getpid()}/fd /proc/{os.getpid()}/task/*/cwd | grep {directory}",
        shell=True,
        check=False,
        capture_output=True,
        text=True,
    ).stdout
    raise AssertionError(f"cannot unmount {directory}: {result.stderr.strip()}\n{holders}")


def in_sync_with(agent: Agent, node: NodeTree, password: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return agent_passwords(node) == (password, password) and agent.in_sync()
        except (OSError, ValueError):
            return False

    return check


def complete(contents: dict[str, bytes | None], before: dict[str, bytes | None]) -> None:
    """Every file that changed is a complete new version (nothing half-written)."""
    for name, content in contents.items():
        if content is None or content == before[name]:
            continue
        if name == "config.toml":
            tomllib.loads(content.decode())
        else:
            json.loads(content)


def error_lines(caplog: pytest.LogCaptureFixture, since: int) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records[since:]
        if record.levelno >= logging.ERROR and record.name.startswith("node_agent")
    ]


def failed_event(agent: Agent, fault: Fault) -> list[dict[str, Any]]:
    return [
        event
        for event in agent.events(FAILED_EVENT)
        if fault.cause in event["message"] and fault.names in event["message"]
    ]


# --- in this process ---------------------------------------------------------------------------


def test_every_io_fault_is_reported_keeps_the_old_file_and_clears_by_itself(
    node: NodeTree,
    kube_api: KubeApiServer,
    caplog: pytest.LogCaptureFixture,
    leak_audit: LeakAudit,
    record_property: Any,
) -> None:
    rounds = campaign_size(quick=1, full=5)
    rng = random.Random(campaign_seed())
    versions = SecretVersions(kube_api)
    versions.publish()
    settings = scaled_settings(node, kube_api, scale=FAST)
    with (
        campaign(record_property, CAMPAIGN, command=COMMAND) as tally,
        running_in_process(settings, node, kube_api, FAST.timings()) as agent,
    ):
        wait_until(in_sync_with(agent, node, versions.last), timeout=10, what="first sync")
        for _ in range(rounds):
            for fault in rng.sample(FAULTS, len(FAULTS)):
                if fault.needs_root and not IS_ROOT:
                    tally.outcomes[f"skipped, needs root: {fault.needs_root}"] += 1
                    continue
                tally.cases += 1
                tally.outcomes[fault.name] += 1
                with ExitStack() as cleanup:
                    check_fault(fault, node, agent, versions, caplog, cleanup)
        check_symlinks_are_followed(node, agent, versions, leak_audit)
        tally.cases += 2
        tally.outcomes["symlinked node file followed"] += 1
        tally.outcomes["dangling symlink: refused, nothing created"] += 1
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert not tracebacks, "a traceback was logged"
        agent.stop()


def check_fault(
    fault: Fault,
    node: NodeTree,
    agent: Agent,
    versions: SecretVersions,
    caplog: pytest.LogCaptureFixture,
    cleanup: ExitStack,
) -> None:
    """Inject, watch the daemon fail cleanly and keep failing the same way, clear, converge."""
    agent.wait_idle(quiet=0.1)  # no pass of the case before still under way
    errors_before = agent.passes("error")
    counted_before = sum(event["count"] for event in failed_event(agent, fault))
    logged_from = len(caplog.records)
    clear = fault.inject(node)
    cleanup.callback(clear)  # cleared even if a check fails
    before = node.contents()  # with whatever odd thing now stands where a file was
    # A new registry each time (the last one's goes): the agent owns a new entry, so the
    # state is saved before any node file is written.
    versions.publish(also=[f"extra-{len(versions.published)}.example"])
    wait_until(
        lambda: agent.passes("error") >= errors_before + 3,
        timeout=5,
        what=f"{fault.name}: a failed pass and two failed retries",
    )
    wait_until(
        lambda: sum(event["count"] for event in failed_event(agent, fault)) >= counted_before + 2,
        timeout=5,
        what=f"{fault.name}: the Event, counted again on a retry",
    )
    events = failed_event(agent, fault)
    assert len(events) == 1, f"{fault.name}: an Event per retry: {events}"
    assert events[0]["type"] == "Warning"
    after = node.contents()
    for name in fault.untouched:
        assert after[name] == before[name], f"{fault.name}: {name} changed"
    complete(after, before)
    targets = {"config.toml": "containerd", "config.json": "kubelet"}
    for name in set(fault.untouched) & targets.keys():
        assert agent.metric("node_agent_in_sync", target=targets[name]) == 0
    errors = [line for line in error_lines(caplog, logged_from) if "reconcile failed" in line]
    assert len(errors) == 1, f"{fault.name}: logged {errors}"
    assert fault.cause in errors[0] and fault.names in errors[0], errors[0]

    cleanup.close()  # the operator fixes it; the daemon must notice by itself
    wait_until(
        in_sync_with(agent, node, versions.last),
        timeout=5,
        what=f"{fault.name}: converged after the fault was cleared",
    )
    assert node.temp_files() == []
    wait_until(  # a pass may hold a file open for a moment; a leak stays
        lambda: not open_descriptors(node.root),
        timeout=2,
        what=lambda: f"{fault.name}: descriptors left open: {open_descriptors(node.root)}",
    )


def open_descriptors(directory: Path) -> list[str]:
    """What this process (the daemon's, here) holds open under `directory`."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(str(directory)):
            held.append(target)
    return held


def check_symlinks_are_followed(
    node: NodeTree, agent: Agent, versions: SecretVersions, leak_audit: LeakAudit
) -> None:
    """README: a symlinked node file is followed and the link kept (the file it names made
    0600); a link to nothing is refused, and nothing is created where it points."""
    image = node.root / "image"
    image.mkdir()
    real_toml = image / "config.toml"
    real_toml.write_bytes(node.config_toml.read_bytes())
    real_toml.chmod(0o644)
    node.config_toml.unlink()
    node.config_toml.symlink_to(Path("../../image/config.toml"))
    real_json = image / "config.json"
    leak_audit.guard_node(files=[real_toml, real_json])
    node.config_json.unlink()
    node.config_json.symlink_to(real_json)
    refusals = agent.metric("node_agent_reconcile_total", result="error")
    versions.publish()
    wait_until(
        lambda: agent.metric("node_agent_reconcile_total", result="error") > refusals,
        timeout=5,
        what="the dangling link refused",
    )
    assert not real_json.exists()
    real_json.write_text(FOREIGN_JSON)
    password = versions.publish()
    wait_until(in_sync_with(agent, node, password), timeout=5, what="through the links")
    assert node.config_toml.is_symlink() and node.config_json.is_symlink()
    assert stat.S_IMODE(real_toml.stat().st_mode) == 0o600
    assert tomllib.loads(real_toml.read_text())["root"] == "/var/lib/containerd"  # foreign kept
    assert "reg.example:5000" in json.loads(real_json.read_text())["auths"]


# --- permission denied: a child without CAP_DAC_OVERRIDE --------------------------------------


@contextmanager
def not_ours(path: Path, mode: int) -> Iterator[None]:
    """`path` owned by someone else (as root), or without permission (not root)."""
    original = path.stat()
    if IS_ROOT:
        os.chown(path, 4321, 4321)
        path.chmod(mode)
    else:
        path.chmod(0o555 if path.is_dir() else 0)
    try:
        yield
    finally:
        if IS_ROOT:
            os.chown(path, original.st_uid, original.st_gid)
        path.chmod(stat.S_IMODE(original.st_mode))


def without_dac_override() -> list[str]:
    """A wrapper for the child: root without the capabilities that bypass file permissions."""
    if not IS_ROOT:
        return []
    if shutil.which("capsh") is None:
        # Root passes every permission check; capsh runs the agent without that power.
        pytest.skip("capsh (libcap2-bin) not installed: as root, permission faults need it")
    return ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c"]


@dataclass(frozen=True)
class PermissionFault:
    name: str
    path_of: Callable[[NodeTree], Path]
    mode: int
    """Its mode while someone else owns it."""
    cause: str
    untouched: tuple[str, ...]


PERMISSION_FAULTS = [
    PermissionFault(
        "config dir not writable",
        lambda node: node.config_toml.parent,
        0o755,
        "cannot create temp file: Permission denied",
        ("config.toml",),
    ),
    PermissionFault(
        "config.json not readable",
        lambda node: node.config_json,
        0o600,
        "cannot read: Permission denied",
        ("config.toml", "config.json", "owned.json"),
    ),
]


def child_events(kube_api: KubeApiServer, cause: str) -> list[dict[str, Any]]:
    return [e for e in kube_api.events("default", reason=FAILED_EVENT) if cause in e["message"]]


def event_counted(kube_api: KubeApiServer, cause: str, times: int) -> bool:
    return sum(int(event["count"]) for event in child_events(kube_api, cause)) >= times


def failed_passes_since(agent: AgentProcess, before: float, passes: int) -> bool:
    return agent.metric("node_agent_reconcile_total", result="error") >= before + passes


def test_permission_denied_is_reported_and_clears_by_itself_in_node_agent_run(
    tmp_path: Path, kube_api: KubeApiServer, leak_audit: LeakAudit, record_property: Any
) -> None:
    node = NodeTree.create(tmp_path / "child-node")
    leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
    versions = SecretVersions(kube_api)
    versions.publish()
    argv = daemon_argv(node, kube_api, extra=["--resync-interval", "1s", "--debounce", "50ms"])
    agent = AgentProcess.start(argv, log=tmp_path / "agent.log", wrapper=without_dac_override())
    try:
        with campaign(record_property, CAMPAIGN, command=COMMAND) as tally:
            wait_until(
                lambda: agent.in_sync() and agent_passwords(node) == (versions.last,) * 2,
                timeout=20,
                what=lambda: f"first sync; log:\n{agent.log_text()[-2000:]}",
            )
            for fault in PERMISSION_FAULTS:
                name, cause = fault.name, fault.cause
                errors_before = agent.metric("node_agent_reconcile_total", result="error")
                before = node.contents()
                with not_ours(fault.path_of(node), fault.mode):
                    versions.publish()
                    wait_until(
                        functools.partial(failed_passes_since, agent, errors_before, 2),
                        timeout=10,
                        what=f"{name}: failed twice",
                    )
                    wait_until(
                        functools.partial(event_counted, kube_api, cause, 2),
                        timeout=10,
                        what=f"{name}: the Event counted twice",
                    )
                    assert len(child_events(kube_api, cause)) == 1
                    after = node.contents()
                    for file in fault.untouched:
                        assert after[file] == before[file], f"{name}: {file} changed"
                    complete(after, before)
                    assert agent.metric("node_agent_in_sync", target="containerd") == 0
                wait_until(
                    lambda: agent.in_sync() and agent_passwords(node) == (versions.last,) * 2,
                    timeout=10,
                    what=f"{name}: converged after the fault was cleared",
                )
                assert node.temp_files() == []
                errors = [
                    line
                    for line in agent.log_text().splitlines()
                    if " ERROR " in line and "reconcile failed: " in line and cause in line
                ]
                assert len(errors) == 1, errors
                tally.cases += 1
                tally.outcomes[f"child: {name}"] += 1
            assert agent.stop() == 0
            assert "Traceback" not in agent.log_text()
    finally:
        agent.stop()
