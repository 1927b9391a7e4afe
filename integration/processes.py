"""Small process and network helpers shared by the registry and containerd harnesses."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"

_LOG_TAIL_CHARS = 3000


class HarnessError(RuntimeError):
    """A test service (registry, containerd) did not start, stop or answer as expected."""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The port is released before it is returned, so another process could take it; on a test
    machine that race is rare enough, and the service's readiness check would then fail loudly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it is true (returns True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def log_tail(path: Path) -> str:
    """The end of a service's log file, for error messages that say why it failed."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return text[-_LOG_TAIL_CHARS:]


def pid_is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie.

    containerd outlives the script that started it and is reaped by PID 1, which may take a
    while: ``kill(pid, 0)`` would report such a zombie as alive.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Field 3 (state) follows the parenthesised command name, which may itself contain spaces.
    state = stat.rpartition(")")[2].split()[0]
    return state not in {"Z", "X"}


def pid_cmdline(pid: int) -> list[str]:
    """The argv of ``pid``, or ``[]`` when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
