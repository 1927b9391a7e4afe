"""Watching directories for changes to the files the daemon cares about (watchdog/inotify).

Parent directories are watched, not files: an atomic replace (ours, an editor's, kubelet's
`..data` swap in a Secret volume) puts a new inode under the name, and a watch on the old
inode would see nothing more. One watch per directory, whatever number of interests.

Only events that can change content count (created, modified, moved, deleted, closed after
writing): reads by the agent itself must not wake it. watchdog drops events on an inotify
queue overflow and only logs it; the daemon's periodic resync covers that.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger(__name__)

CONTENT_EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


@dataclass(frozen=True)
class Interest:
    """Call `notify` on a change to `names` in `directory` (None: any name in it)."""

    directory: Path
    names: frozenset[str] | None
    notify: Callable[[], None]

    def matches(self, name: str) -> bool:
        return self.names is None or name in self.names


def interest_in_file(path: Path, notify: Callable[[], None]) -> Interest:
    """A node file: changes to its name in its directory."""
    absolute = Path(os.path.abspath(path))
    return Interest(absolute.parent, frozenset({absolute.name}), notify)


def interest_in_source(path: Path, notify: Callable[[], None]) -> Interest:
    """A `--secret-file`: anything in a Secret volume directory (kubelet swaps `..data`), or
    anything beside a file (it may be a link into a volume's `..data`)."""
    absolute = Path(os.path.abspath(path))
    directory = absolute if absolute.is_dir() else absolute.parent
    return Interest(directory, None, notify)


class _Dispatcher(FileSystemEventHandler):
    """The one handler of one directory: routes each event to the interests it matches."""

    def __init__(self, interests: list[Interest]) -> None:
        self._interests = interests

    def on_any_event(self, event: FileSystemEvent) -> None:
        names = {_name(event.src_path), _name(getattr(event, "dest_path", "") or "")}
        for interest in self._interests:
            if any(name and interest.matches(name) for name in names):
                interest.notify()


def _name(path: str | bytes) -> str:
    return os.path.basename(os.fsdecode(path))


class DirectoryWatch:
    """Watches the directories of `interests` from watchdog's threads until `stop()`."""

    def __init__(self, interests: list[Interest], *, timeout: float = 1.0) -> None:
        self._by_directory: dict[Path, list[Interest]] = {}
        for interest in interests:
            self._by_directory.setdefault(interest.directory, []).append(interest)
        self._observer = Observer(timeout=timeout)
        self._observer.name = "file-watch"

    @property
    def directories(self) -> list[Path]:
        return sorted(self._by_directory)

    def start(self) -> None:
        # Started first, so each directory's watch begins (or fails: a directory that does
        # not exist yet) in `schedule`, one at a time, instead of failing the whole start.
        self._observer.start()
        for directory, interests in self._by_directory.items():
            try:
                self._observer.schedule(
                    _Dispatcher(interests), str(directory), event_filter=CONTENT_EVENTS
                )
            except OSError as error:
                log.warning(
                    "cannot watch %s (%s); relying on the periodic resync for it",
                    directory,
                    error.strerror or error,
                )
        log.info("watching %s", ", ".join(map(str, self.directories)))

    def is_alive(self) -> bool:
        return bool(self._observer.is_alive())

    def stop(self, timeout: float = 2.0) -> None:
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(timeout)
