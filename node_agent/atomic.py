"""Crash-safe file replacement with a compare-and-swap check.

A node file is replaced by writing a temp file in the same directory, fsyncing it, renaming
it over the target and fsyncing the directory: after a crash the file is either the old or
the new content, never a mix. Just before the rename the target is read again; if someone
else changed it since our read, nothing is written and `ConcurrentModification` is raised so
the caller can redo its work from the fresh content instead of overwriting theirs.

A write by someone else can still land between that last read and the rename (for a busy
writer it did, about once in a hundred writes). So the "rename" is an exchange
(`renameat2(RENAME_EXCHANGE)`): the two names swap atomically, the file that comes out is
the one that was in place at that instant, and it is checked: not what we read means
someone wrote in between, so their file is exchanged back into place and the pass redone.
A new file is put in place only if the name is still free (`RENAME_NOREPLACE`). Where the
kernel, libc or filesystem has no renameat2, a plain rename is used (the check before it
stays).

A target that is a symlink is followed (the link is kept, the file it points to replaced):
tools that manage the target through a link keep working. Links are followed inside the
host root, as the node sees them (`node_agent.host_paths`); a link to nothing is refused.
"""

import contextlib
import ctypes
import errno
import functools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node_agent.errors import ConcurrentModification, WriteFailed
from node_agent.host_paths import resolved_target

#: The host root when the agent runs on the node itself.
HOST_ROOT = Path("/")

#: Group and other permission bits. Files the agent writes carry credentials, so these are
#: always cleared (an existing 0644 config.toml becomes 0600).
GROUP_OTHER_BITS = 0o077
NEW_FILE_MODE = 0o600

# renameat2(2): linux/fs.h and fcntl.h.
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: Errors meaning "renameat2 cannot do that here" (old kernel, filesystem without it): use
#: rename(2). ENOENT too: the target vanished, or the path is not on the real filesystem
#: (pyfakefs in tests); rename(2) then does what it always did.
_NO_RENAMEAT2 = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT})
#: How often someone else's file is put back before giving up (each time they wrote again
#: within the microseconds of one exchange).
_MAX_PUT_BACKS = 8


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


def read_snapshot(path: Path, *, root: Path = HOST_ROOT) -> FileSnapshot:
    """Read `path` (following symlinks inside `root`, the host root it is under). Raises
    WriteFailed when it cannot be read at all."""
    resolved = resolved_target(root, path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer forever.
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return FileSnapshot(path=resolved, content=None)
    except OSError as error:
        raise WriteFailed(f"{path}: cannot read: {error.strerror}") from None
    # The descriptor is checked before it is wrapped, and closed here whatever happens: a
    # directory opens fine, and `open(fd)` refuses it without closing the descriptor it was
    # given (a daemon retrying would leak one per pass).
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise WriteFailed(f"{path}: is a directory, expected a file")
        if not stat.S_ISREG(info.st_mode):
            raise WriteFailed(f"{path}: not a regular file")
        with open(fd, "rb", closefd=False) as file:
            content = file.read()
    except OSError as error:
        raise WriteFailed(f"{path}: cannot read: {error.strerror}") from None
    finally:
        os.close(fd)
    return FileSnapshot(
        path=resolved,
        content=content,
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
    )


def replace_file(snapshot: FileSnapshot, data: bytes, *, mode: int | None = None) -> None:
    """Atomically replace the file read as `snapshot` with `data`, keeping its owner and
    mode (less group/other bits), or with `mode` when given. Raises ConcurrentModification
    if the file changed since `snapshot` was taken, WriteFailed on any I/O error (the old
    file is then intact)."""
    target = snapshot.path
    if mode is None:
        mode = NEW_FILE_MODE if snapshot.mode is None else snapshot.mode & ~GROUP_OTHER_BITS
    temp = _write_temp(target, data, mode=mode, owner=_owner(snapshot))
    try:
        _check_unchanged(snapshot)
        _swap_in(temp, snapshot, data)
    finally:
        # After an exchange `temp` holds the previous version; after a failure, nothing ours.
        with contextlib.suppress(OSError):
            temp.unlink()
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


def _swap_in(temp: Path, snapshot: FileSnapshot, data: bytes) -> None:
    """Put `temp` (holding `data`) where `snapshot` was read, only if what is there at that
    instant is still what was read. On return `temp` holds the previous version (or is gone);
    the caller removes it."""
    target = snapshot.path
    if snapshot.content is None:
        if not _exchange(temp, target, flags=_RENAME_NOREPLACE):
            _rename(temp, target)
        return
    if not _exchange(temp, target, flags=_RENAME_EXCHANGE):
        _rename(temp, target)
        return
    if _read_or_none(temp) == snapshot.content:
        return
    _put_back(temp, target, data)
    raise ConcurrentModification(f"{target}: changed by someone else while we wrote it")


def _put_back(temp: Path, target: Path, data: bytes) -> None:
    """Someone wrote `target` between our last read and our exchange: their file, now at
    `temp`, goes back in place and ours comes out. If they wrote again in between (over ours),
    that newer file goes back in place instead, and so on."""
    coming_out: bytes | None = data  # what should be at `target` when we exchange again
    for _ in range(_MAX_PUT_BACKS):
        going_in = _read_or_none(temp)
        if not _exchange(temp, target, flags=_RENAME_EXCHANGE):
            break  # the target is gone: nothing of theirs to put back over
        if _read_or_none(temp) == coming_out:
            return
        coming_out = going_in
    raise ConcurrentModification(f"{target}: kept changing while we put it back")


def _exchange(temp: Path, target: Path, *, flags: int) -> bool:
    """renameat2(`temp`, `target`, `flags`); False when renameat2 cannot be used here (then
    rename(2) is the fallback). ConcurrentModification when `target` appeared meanwhile
    (RENAME_NOREPLACE)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(temp), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_RENAMEAT2:
        return False
    if code == errno.EEXIST:
        raise ConcurrentModification(f"{target}: created by someone else while we worked")
    raise WriteFailed(f"{target}: cannot replace: {os.strerror(code)}")


@functools.cache
def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """libc's renameat2 (glibc >= 2.28), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    renameat2: Callable[[int, bytes, int, bytes, int], int] = function
    return renameat2


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


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
        # It was read a moment ago: whatever stands there now (a directory, a link loop, a
        # file we may no longer read) is someone else's doing. Redoing the pass from fresh
        # reads reports it the way a first read would.
        raise ConcurrentModification(
            f"{snapshot.path}: replaced while we worked ({error.strerror})"
        ) from None
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
