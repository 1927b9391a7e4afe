"""Crash-safe file replacement with a compare-and-swap check.

A node file is replaced by writing a temp file in the same directory, fsyncing it, renaming
it over the target and fsyncing the directory: after a crash the file is either the old or
the new content, never a mix. Just before the rename the target is read again; if someone
else changed it since our read, nothing is written and `ConcurrentModification` is raised so
the caller can redo its work from the fresh content instead of overwriting theirs.

A target that is a symlink is followed (the link is kept, the file it points to replaced):
tools that manage the target through a link keep working.
"""

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from node_agent.errors import ConcurrentModification, WriteFailed

#: Group and other permission bits. Files the agent writes carry credentials, so these are
#: always cleared (an existing 0644 config.toml becomes 0600).
GROUP_OTHER_BITS = 0o077
NEW_FILE_MODE = 0o600


@dataclass(frozen=True)
class FileSnapshot:
    """A file as read: its resolved path, bytes (None: absent), mode and owner."""

    path: Path
    content: bytes | None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None

    @property
    def exists(self) -> bool:
        return self.content is not None


def read_snapshot(path: Path) -> FileSnapshot:
    """Read `path` (following symlinks). Raises WriteFailed when it cannot be read at all."""
    try:
        resolved = path.resolve()
    except RuntimeError:  # a symlink loop (Python < 3.13)
        raise WriteFailed(f"{path}: symlink loop") from None
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer forever.
        with open(os.open(resolved, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            info = os.fstat(file.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise WriteFailed(f"{path}: is a directory, expected a file")
            if not stat.S_ISREG(info.st_mode):
                raise WriteFailed(f"{path}: not a regular file")
            content = file.read()
    except FileNotFoundError:
        return FileSnapshot(path=resolved, content=None)
    except IsADirectoryError:
        raise WriteFailed(f"{path}: is a directory, expected a file") from None
    except OSError as error:
        raise WriteFailed(f"{path}: cannot read: {error.strerror}") from None
    return FileSnapshot(
        path=resolved,
        content=content,
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
    )


def replace_file(snapshot: FileSnapshot, data: bytes) -> None:
    """Atomically replace the file read as `snapshot` with `data`, keeping its owner and
    mode (less group/other bits). Raises ConcurrentModification if the file changed since
    `snapshot` was taken, WriteFailed on any I/O error (the old file is then intact)."""
    target = snapshot.path
    mode = NEW_FILE_MODE if snapshot.mode is None else snapshot.mode & ~GROUP_OTHER_BITS
    temp = _write_temp(target, data, mode=mode, owner=_owner(snapshot))
    try:
        _check_unchanged(snapshot)
        _rename(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_directory(target.parent)


def write_new_file(path: Path, data: bytes, *, mode: int = NEW_FILE_MODE) -> None:
    """Atomically write `path` whatever it held (for the agent's own state files)."""
    temp = _write_temp(path, data, mode=mode, owner=None)
    try:
        _rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_directory(path.parent)


def _rename(temp: Path, target: Path) -> None:
    try:
        os.rename(temp, target)
    except OSError as error:
        raise WriteFailed(f"{target}: cannot replace: {error.strerror}") from None


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise WriteFailed(f"{directory}: cannot open to fsync: {error.strerror}") from None
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner(snapshot: FileSnapshot) -> tuple[int, int] | None:
    if snapshot.uid is None or snapshot.gid is None:
        return None
    return snapshot.uid, snapshot.gid


def _write_temp(target: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None) -> Path:
    # Same directory as the target: rename is atomic only within one filesystem. The name
    # starts with a dot and carries the pid so leftovers are recognisable
    # (see `remove_stale_temps`).
    temp = target.with_name(f".{target.name}.node-agent-{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    except FileNotFoundError:
        raise WriteFailed(
            f"{target.parent}: directory does not exist (wrong path or --host-root?)"
        ) from None
    except OSError as error:
        raise WriteFailed(f"{target}: cannot create temp file: {error.strerror}") from None
    try:
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; this is not
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(fd, *owner)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise WriteFailed(f"{target}: cannot write: {error.strerror}") from None
    return temp


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _check_unchanged(snapshot: FileSnapshot) -> None:
    try:
        current: bytes | None = snapshot.path.read_bytes()
    except FileNotFoundError:
        current = None
    except OSError as error:
        raise WriteFailed(f"{snapshot.path}: cannot re-read: {error.strerror}") from None
    if current != snapshot.content:
        raise ConcurrentModification(f"{snapshot.path}: changed by someone else while we worked")


def remove_stale_temps(target: Path) -> None:
    """Remove temp files a killed agent left beside `target` (any pid but ours)."""
    prefix = f".{target.name}.node-agent-"
    with contextlib.suppress(OSError):
        for leftover in target.parent.iterdir():
            if leftover.name.startswith(prefix) and leftover.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
