"""Node paths resolved the way the node itself sees them, never outside `--host-root`.

The node's filesystem is mounted at the host root (`/host` in the DaemonSet). A symlink on
the node means what it means on the node: an absolute target starts at the host root, not at
the agent's own `/`, and `..` never climbs above the host root (as the kernel's
`openat2(RESOLVE_IN_ROOT)` resolves). Following links in the agent's own view would read, or
create credential files, outside the node's tree.

Resolution walks the path one component at a time with `lstat`/`readlink`. Between the walk
and the use of its result a path can still change (only root on the node can do that); the
files the agent writes are then replaced by a rename inside the resolved directory, which
never follows a link.
"""

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from node_agent.errors import WriteFailed

#: Links followed in one resolution before it is a loop (Linux's own limit is 40).
MAX_LINK_HOPS: Final = 40


@dataclass(frozen=True)
class Resolved:
    """Where a node path leads inside the host root."""

    path: Path
    exists: bool
    dangling_link: str | None = None
    """The link (as a node path) whose target does not exist, when the path ends at one."""


def resolve_in_root(root: Path, path: Path) -> Resolved:
    """`path` (under `root`) with every symlink followed inside `root`. Raises WriteFailed
    for a symlink loop or a path that is not under `root`."""
    try:
        relative = PurePosixPath(path).relative_to(root)
    except ValueError:
        raise WriteFailed(f"{path}: not under the host root {root}") from None
    # Components still to walk, last first; each with the link it came from (None: `path`).
    pending: list[tuple[str, str | None]] = [(part, None) for part in reversed(relative.parts)]
    done: list[str] = []
    hops = 0
    while pending:
        part, from_link = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            rest = [part, *(name for name, _ in reversed(pending))]
            return Resolved(root.joinpath(*done, *rest), exists=False, dangling_link=from_link)
        except OSError as error:
            raise WriteFailed(f"{path}: cannot resolve: {error.strerror}") from None
        if not stat.S_ISLNK(info.st_mode):
            done.append(part)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            raise WriteFailed(f"{path}: symlink loop")
        target = PurePosixPath(os.readlink(candidate))
        link = "/" + "/".join([*done, part])
        if target.is_absolute():
            done = []
        parts = target.parts[1:] if target.is_absolute() else target.parts
        pending.extend((name, link) for name in reversed(parts))
    return Resolved(root.joinpath(*done), exists=True)


def resolved_target(root: Path, path: Path) -> Path:
    """Where a node file at `path` really is, inside `root`. Raises WriteFailed for a loop,
    and for a link to nothing: the agent will not create a credential file wherever a
    dangling link points."""
    resolved = resolve_in_root(root, path)
    if resolved.dangling_link is not None:
        raise WriteFailed(
            f"{path}: dangling symlink ({resolved.dangling_link} points to "
            f"{resolved_node_path(root, resolved.path)}, which does not exist); fix or remove "
            "the link"
        )
    return resolved.path


def resolved_node_path(root: Path, path: Path) -> str:
    """`path` under `root` as the node names it."""
    return "/" + str(PurePosixPath(path).relative_to(root)).lstrip(".").lstrip("/")


def open_directory_no_follow(path: Path) -> int:
    """A descriptor of the directory at `path`, refusing a symlink in its last component
    (for changing the directory's mode through the descriptor, never through a link)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise WriteFailed(f"{path}: not a directory (a symlink?)") from None
        raise WriteFailed(f"{path}: cannot open: {error.strerror}") from None
