"""What the agent owns on this node, persisted in the state dir (`owned.json`, mode 0600 in a
0700 directory: previous values are credentials too).

Layout: {"version": 1, "owned": {TARGET: {FILE_KEY: PREVIOUS}}, "containerd_restart_pending": B,
"containerd_last_good": {"path": P, "text": T}} where PREVIOUS is what the file held under
FILE_KEY before the agent took it (null: absent).
`containerd_restart_pending` is set before config.toml is written and cleared once containerd
was restarted and answered CRI, so a crash in between still leads to a restart next time.
`containerd_last_good` (only while a restart is pending) is config.toml as it was before the
unconfirmed write (T null: absent), so a restart that fails after such a crash can still be
rolled back.
"""

import contextlib
import errno
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node_agent.atomic import HOST_ROOT, remove_stale_temps, write_new_file
from node_agent.errors import UnsupportedConfig, WriteFailed, json_position
from node_agent.host_paths import open_directory_no_follow, resolved_target
from node_agent.plan import Owned

STATE_FILE = "owned.json"
STATE_VERSION = 1
STATE_DIR_MODE = 0o700


@dataclass(frozen=True)
class LastGood:
    """config.toml (resolved `path`) as it was before a write containerd has not yet been
    restarted on; `text` None: the file did not exist."""

    path: str
    text: str | None


@dataclass(frozen=True)
class AgentState:
    """Everything the agent remembers between runs."""

    owned: dict[str, Owned] = field(default_factory=dict)
    containerd_restart_pending: bool = False
    containerd_last_good: LastGood | None = None

    def owned_in(self, target: str) -> Owned:
        return self.owned.get(target, {})


class StateStore:
    """Loads and saves `AgentState` in one directory, a node path under the host `root`
    (links in it are followed inside the root; the state file itself is never a link)."""

    def __init__(self, directory: Path, *, root: Path = HOST_ROOT) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.root = root

    def load(self) -> AgentState:
        path = self._resolved_directory() / STATE_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return AgentState()
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise WriteFailed(f"{self.path}: is a symlink; refusing to read state") from None
            raise WriteFailed(f"{self.path}: cannot read state: {error.strerror}") from None
        try:
            with open(fd, "rb", closefd=False) as file:
                raw = file.read()
        except OSError as error:
            raise WriteFailed(f"{self.path}: cannot read state: {error.strerror}") from None
        finally:
            os.close(fd)
        return _decode(str(self.path), raw)

    def exists(self) -> bool:
        """Whether the state file is there (a pass that fails may have to remove it again)."""
        try:
            return (self._resolved_directory() / STATE_FILE).is_file()
        except WriteFailed:
            return False

    def discard(self) -> None:
        """Remove the state file (back to "nothing owned, nothing remembered")."""
        with contextlib.suppress(FileNotFoundError):
            (self._resolved_directory() / STATE_FILE).unlink()

    def save(self, state: AgentState) -> None:
        path = self._ensure_directory() / STATE_FILE
        remove_stale_temps(path)  # left by a run killed while saving
        document = {
            "version": STATE_VERSION,
            "owned": state.owned,
            "containerd_restart_pending": state.containerd_restart_pending,
        }
        if state.containerd_last_good is not None:
            document["containerd_last_good"] = asdict(state.containerd_last_good)
        write_new_file(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())

    def _resolved_directory(self) -> Path:
        return resolved_target(self.root, self.directory)

    def _ensure_directory(self) -> Path:
        """The state dir inside the root, created if missing, narrowed to 0700 through a
        descriptor of the directory itself (never through a symlink)."""
        directory = self._resolved_directory()
        try:
            directory.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        except OSError as error:
            raise WriteFailed(
                f"{self.directory}: cannot create state dir: {error.strerror}"
            ) from None
        fd = open_directory_no_follow(directory)
        try:
            os.fchmod(fd, STATE_DIR_MODE)
        except OSError as error:
            problem = f"cannot chmod state dir: {error.strerror}"
            raise WriteFailed(f"{self.directory}: {problem}") from None
        finally:
            os.close(fd)
        return directory


def _decode(path: str, raw: bytes) -> AgentState:
    # A state file we cannot read means we no longer know what we own: refuse rather than
    # guess, since a wrong guess deletes or keeps someone else's credentials.
    try:
        document: Any = json.loads(raw)
    except ValueError as error:
        problem = (
            f"state file is not valid JSON{json_position(error)}; restore it from a copy or "
            "fix it (removed, the agent forgets what it took over: docs/upgrading.md)"
        )
        raise UnsupportedConfig(path, problem) from None
    if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
        raise UnsupportedConfig(path, f"state file is not version {STATE_VERSION}")
    owned = document.get("owned", {})
    if not isinstance(owned, dict) or not all(
        isinstance(keys, dict) and all(v is None or isinstance(v, dict) for v in keys.values())
        for keys in owned.values()
    ):
        raise UnsupportedConfig(path, "state file 'owned' has an unexpected shape")
    pending = document.get("containerd_restart_pending", False)
    last_good = document.get("containerd_last_good")
    if last_good is not None and not (
        isinstance(last_good, dict)
        and isinstance(last_good.get("path"), str)
        and isinstance(last_good.get("text"), str | None)
    ):
        raise UnsupportedConfig(path, "state file 'containerd_last_good' has an unexpected shape")
    return AgentState(
        owned=owned,
        containerd_restart_pending=bool(pending),
        containerd_last_good=None
        if last_good is None
        else LastGood(last_good["path"], last_good.get("text")),
    )
