"""Run `node-agent ARGV` and SIGKILL it at one precise point (crash campaign, RELIABILITY.md).

    python tests/kill_at.py --kill before:os.rename:2 -- reconcile --secret-file ...
    python tests/kill_at.py --census OUT.json -- reconcile --secret-file ...

The product code knows nothing of this: a `sys.setprofile` hook watches the calls of the
agent's process and, with `--kill WHEN:POINT:N`, kills the process with SIGKILL on the Nth
time POINT is reached, `before` it runs or `after` it returned (or raised). With `--census`
nothing is killed: the hook counts how often each point is reached and writes, as JSON,
`{"counts": {"before:os.rename": 3, ...}, "renamed": {TARGET_NAME: [sha256, ...]}}` —
`renamed` lists the content of every file renamed onto a target, in order, so the campaign
knows every version a clean run writes.

The points are the steps of a write and of a restart: the system calls of `atomic.py`
(`os.open`, `os.fchmod`, `os.write`, `os.fsync`, `os.close`, `os.rename`, `os.unlink`; a node
file is put in place by `atomic._exchange`, renameat2 through ctypes, which the hook sees as
a function) and the agent functions around them (state save, file replace, stale temp
cleanup, rollback, the restart command, the CRI health check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from node_agent import atomic, containerd_restart, reconcile
from node_agent.cli import main
from node_agent.ownership import StateStore

SYSCALLS: dict[str, Callable[..., Any]] = {
    "os.open": os.open,
    "os.fchmod": os.fchmod,
    "os.write": os.write,
    "os.fsync": os.fsync,
    "os.close": os.close,
    "os.rename": os.rename,
    "os.unlink": os.unlink,
}
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "StateStore.save": StateStore.save,
    "replace_file": atomic.replace_file,
    "atomic._exchange": atomic._exchange,
    "remove_stale_temps": atomic.remove_stale_temps,
    "roll_back": reconcile._roll_back,
    "restart command": containerd_restart.CommandRestarter.restart,
    "CRI health check": containerd_restart.wait_for_cri,
}
POINTS = tuple(f"{when}:{name}" for name in (*SYSCALLS, *FUNCTIONS) for when in ("before", "after"))


class Hook:
    """The profile function: counts points, kills at the chosen one, records renames."""

    def __init__(self, kill_at: tuple[str, int] | None) -> None:
        self.kill_at = kill_at
        self.counts: Counter[str] = Counter()
        self.renamed: dict[str, list[str]] = {}
        self._syscalls = {id(function): name for name, function in SYSCALLS.items()}
        self._functions: dict[CodeType, str] = {
            function.__code__: name for name, function in FUNCTIONS.items()
        }

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event in ("c_call", "c_return", "c_exception"):
            name = self._syscalls.get(id(arg))
            when = "before" if event == "c_call" else "after"
        elif event in ("call", "return"):
            name = self._functions.get(frame.f_code)
            when = "before" if event == "call" else "after"
        else:
            return
        if name is None:
            return
        point = f"{when}:{name}"
        self.counts[point] += 1
        if self.kill_at == (point, self.counts[point]):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kill_at is None and point in ("before:os.rename", "before:atomic._exchange"):
            self._record_rename(frame)

    def _record_rename(self, frame: FrameType) -> None:
        # The frame is atomic._exchange(temp, target, ...) or the caller of os.rename,
        # atomic._rename(temp, target).
        temp, target = frame.f_locals.get("temp"), frame.f_locals.get("target")
        if isinstance(temp, Path) and isinstance(target, Path):
            digest = hashlib.sha256(temp.read_bytes()).hexdigest()
            self.renamed.setdefault(target.name, []).append(digest)


def parse_kill(text: str) -> tuple[str, int]:
    when, name, count = text.rsplit(":", 2)
    point = f"{when}:{name}"
    if point not in POINTS:
        raise argparse.ArgumentTypeError(f"unknown point {point!r}")
    return point, int(count)


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--kill", type=parse_kill, metavar="WHEN:POINT:N")
    mode.add_argument("--census", type=Path, metavar="OUT.json")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    hook = Hook(args.kill)
    sys.setprofile(hook)
    try:
        return main(argv, environ={})
    finally:
        sys.setprofile(None)
        if args.census is not None:
            census = {"counts": dict(hook.counts), "renamed": hook.renamed}
            args.census.write_text(json.dumps(census, indent=1, sort_keys=True))


if __name__ == "__main__":
    sys.exit(run())
