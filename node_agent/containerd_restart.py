"""Restarting containerd, and proving it came back healthy.

containerd reads config.toml only at start, and SIGHUP kills it, so a changed auth table
needs a real restart. ``--reload`` chooses how, :func:`make_restarter` builds it:

* ``none``: the operator restarts containerd; the agent only writes files.
* ``command``: run a command (``--reload-command``), e.g. ``nsenter -t 1 -m -- systemctl
  restart containerd``.
* ``systemd``: ask systemd over D-Bus (``RestartUnit``) on the host's system bus socket, and
  wait for the job to finish (the ``JobRemoved`` signal).
* ``trigger``: write a request into a directory shared with the host, where a systemd path
  unit installed on the node restarts containerd and answers in the same directory
  (``daemonset/restart-trigger/``). The agent then needs no D-Bus socket: all it can make
  the host do is restart containerd.

A restart that "succeeded" proves little: a config error can leave containerd running with
its CRI plugin down. :func:`wait_for_cri` polls the CRI ``Version`` call, and
:func:`restart_and_check` does both under one time budget; on :class:`RestartFailed` the
caller (the reconciler) restores the previous config and calls it again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from node_agent.atomic import HOST_ROOT, write_new_file
from node_agent.cri import CriClient, CriError, RuntimeVersion
from node_agent.errors import NodeAgentError, RestartFailed
from node_agent.escaping import bounded
from node_agent.host_paths import resolved_target
from node_agent.systemd_bus import (
    SYSTEMD_BUS_NAME,
    SYSTEMD_MANAGER,
    SYSTEMD_PATH,
    call,
    dbus_error_text,
    manager_call,
    remaining,
)

DEFAULT_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
CONTAINERD_UNIT = "containerd.service"

_MAX_STDERR_LINE = 200
_STDERR_TAIL_BYTES = 4096


class Restarter(Protocol):
    """Restarts containerd. Returns once the restart itself has finished."""

    def restart(self, *, timeout: float) -> None:
        """Raise :class:`RestartFailed` when the restart failed or took longer than ``timeout``."""


# --- command ------------------------------------------------------------------------------


class CommandRestarter:
    """``--reload command``: run ``argv``; a non-zero exit or a timeout is a failed restart."""

    def __init__(self, argv: Sequence[str]) -> None:
        if not argv:
            raise ValueError("the restart command is empty")
        self._argv = tuple(argv)

    def __repr__(self) -> str:
        return f"CommandRestarter({list(self._argv)!r})"

    def restart(self, *, timeout: float) -> None:
        program = self._argv[0]
        # stderr goes to a file, not a pipe: memory stays bounded whatever the command prints,
        # and a leftover grandchild holding the pipe open cannot make us wait past the timeout.
        with tempfile.TemporaryFile() as stderr:
            exit_code = _run_in_own_group(self._argv, stderr=stderr, timeout=timeout)
            if exit_code != 0:
                last_line = _last_line(_tail(stderr, _STDERR_TAIL_BYTES))
                raise RestartFailed(f"{program} exited with code {exit_code}: {last_line}")


def _run_in_own_group(argv: Sequence[str], *, stderr: IO[bytes], timeout: float) -> int:
    """Run ``argv`` in a new session; on timeout kill the whole group, not just the leader."""
    program = argv[0]
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    except OSError as error:
        raise RestartFailed(f"cannot run {program}: {error.strerror or error}") from error
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired as error:
        _kill_group(process)
        raise RestartFailed(f"{program} did not finish within {timeout:g}s; killed") from error


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # it finished between timeout and kill
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(file: IO[bytes], size: int) -> bytes:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - size))
    return file.read()


def _last_line(output: bytes) -> str:
    """The last non-empty line, printable and capped: stderr could hold anything."""
    lines = output.decode(errors="replace").splitlines()
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    printable = "".join(char if char.isprintable() else "?" for char in last)
    if not printable:
        return "(no output on stderr)"
    return bounded(printable, _MAX_STDERR_LINE)


# --- systemd over D-Bus -------------------------------------------------------------------


class SystemdRestarter:
    """``--reload systemd``: ``RestartUnit(unit, "replace")`` and wait for its ``JobRemoved``.

    ``RestartUnit`` only queues a job and answers with its object path; the job's outcome
    ("done", "failed", "timeout", …) arrives later in the ``JobRemoved`` signal, which systemd
    emits only to clients that called ``Subscribe``.
    """

    def __init__(
        self, *, bus_address: str = DEFAULT_BUS_ADDRESS, unit: str = CONTAINERD_UNIT
    ) -> None:
        self._bus_address = bus_address
        self._unit = unit

    def __repr__(self) -> str:
        return f"SystemdRestarter(bus_address={self._bus_address!r}, unit={self._unit!r})"

    def restart(self, *, timeout: float) -> None:
        from jeepney import AuthenticationError  # noqa: PLC0415  (jeepney: only this mode)
        from jeepney.wrappers import DBusErrorResponse  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        try:
            result = self._restart_and_wait(deadline)
        except DBusErrorResponse as error:
            raise RestartFailed(
                f"systemd refused to restart {self._unit}: {dbus_error_text(error)}"
            ) from error
        except TimeoutError as error:
            raise RestartFailed(
                f"restart of {self._unit} did not finish within {timeout:g}s"
            ) from error
        except (OSError, AuthenticationError) as error:
            problem = f"cannot talk to systemd on {self._bus_address}: {error}"
            raise RestartFailed(problem) from error
        if result != "done":
            raise RestartFailed(f"systemd's restart job for {self._unit} ended with {result!r}")

    def _restart_and_wait(self, deadline: float) -> str:
        """Returns the job result. D-Bus errors and timeouts propagate to :meth:`restart`."""
        from jeepney import message_bus  # noqa: PLC0415
        from jeepney.io.blocking import open_dbus_connection  # noqa: PLC0415

        with open_dbus_connection(self._bus_address, auth_timeout=remaining(deadline)) as bus:
            # The bus resolves the well-known name in its own rule; the signals we then get
            # carry systemd's unique name, which the local filter therefore must not check.
            call(bus, message_bus.AddMatch(_job_removed_rule(SYSTEMD_BUS_NAME)), deadline)
            # Filter before RestartUnit: signals that arrive while we wait for its reply are
            # queued instead of dropped, so a fast job cannot finish unseen.
            with bus.filter(_job_removed_rule(None), queue=deque()) as removed_jobs:
                call(bus, manager_call("Subscribe"), deadline)
                restart = manager_call("RestartUnit", "ss", (self._unit, "replace"))
                (job_path,) = call(bus, restart, deadline)
                return _wait_for_job(bus, removed_jobs, job_path, deadline)


def _job_removed_rule(sender: str | None) -> Any:
    from jeepney import MatchRule  # noqa: PLC0415

    return MatchRule(
        type="signal",
        sender=sender,
        interface=SYSTEMD_MANAGER,
        member="JobRemoved",
        path=SYSTEMD_PATH,
    )


def _wait_for_job(bus: Any, removed_jobs: deque[Any], job_path: str, deadline: float) -> str:
    """Consume JobRemoved signals until ours; jobs of other units are skipped."""
    while True:
        job_removed = bus.recv_until_filtered(removed_jobs, timeout=remaining(deadline))
        _job_id, removed_path, _unit, result = job_removed.body
        if removed_path == job_path:
            return str(result)


# --- a request to a systemd path unit on the host -------------------------------------------

#: The file the agent writes: one line, a token new for every restart.
TRIGGER_REQUEST = "request"
#: The file the host's unit writes when containerd's restart is done: `TOKEN EXIT_CODE`.
TRIGGER_DONE = "done"
_TRIGGER_POLL_SECONDS = 0.05
_MAX_DONE_BYTES = 256


class TriggerRestarter:
    """``--reload trigger``: ask the host's ``node-agent-restart-containerd.path`` unit.

    The request is a new token written atomically (temp file + rename: the unit's
    ``PathChanged=`` sees the rename). The unit's service restarts containerd with
    ``systemctl`` and writes ``TOKEN EXIT_CODE`` to ``done``; an answer with another token is
    an older request's. No answer in time means the unit is missing or stuck.
    """

    def __init__(
        self,
        directory: Path,
        *,
        root: Path = HOST_ROOT,
        new_token: Callable[[], str] = lambda: uuid.uuid4().hex,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._root = root
        self._new_token = new_token
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:
        return f"TriggerRestarter({str(self._directory)!r})"

    def restart(self, *, timeout: float) -> None:
        deadline = self._clock() + timeout
        token = self._new_token()
        try:
            directory = resolved_target(self._root, self._directory)
            write_new_file(directory / TRIGGER_REQUEST, f"{token}\n".encode())
        except NodeAgentError as error:
            raise RestartFailed(f"cannot ask the host to restart containerd: {error}") from None
        while (exit_code := self._answer_to(directory, token)) is None:
            if self._clock() >= deadline:
                raise RestartFailed(
                    f"the host did not restart containerd within {timeout:g}s of the request "
                    f"in {self._directory}: is node-agent-restart-containerd.path installed "
                    "and active on this node?"
                )
            self._sleep(_TRIGGER_POLL_SECONDS)
        if exit_code != 0:
            raise RestartFailed(
                f"the host's node-agent-restart-containerd.service: systemctl restart "
                f"containerd exited with code {exit_code}"
            )

    @staticmethod
    def _answer_to(directory: Path, token: str) -> int | None:
        """The exit code the host reported for `token`, None while there is none."""
        try:
            with open(directory / TRIGGER_DONE, "rb") as done:
                answer = done.read(_MAX_DONE_BYTES).decode("ascii", errors="replace").split()
        except OSError:
            return None
        if len(answer) != 2 or answer[0] != token or not answer[1].isdigit():
            return None
        return int(answer[1])


# --- health -------------------------------------------------------------------------------

# One Version call may take this long: short enough that a wedged runtime cannot eat the
# whole budget, long enough for a containerd that is busy reconnecting to its shims.
_MIN_VERSION_CALL_SECONDS = 0.2
_MAX_VERSION_CALL_SECONDS = 2.0


def wait_for_cri(
    socket_path: str,
    *,
    timeout: float,
    poll_interval: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    budget: float | None = None,
) -> RuntimeVersion:
    """Poll CRI ``Version`` until it answers; raise :class:`RestartFailed` after ``timeout``.

    Only a successful ``Version`` counts: an open socket, or a gRPC server that answers
    ``UNIMPLEMENTED`` (containerd running with its CRI plugin failed to load), does not.
    It always asks at least once, even when ``timeout`` is already used up. The error names
    ``budget`` (default ``timeout``): a caller that spent part of its budget on the restart
    passes the whole of it, so the same failure reads the same every time (one Event, one
    log line) rather than with the seconds that happened to be left.
    """
    deadline = clock() + timeout
    with CriClient(socket_path) as cri:
        while True:
            call_timeout = _clamp(
                deadline - clock(), _MIN_VERSION_CALL_SECONDS, _MAX_VERSION_CALL_SECONDS
            )
            try:
                return cri.version(timeout=call_timeout)
            except CriError as error:
                last_error = f"{error.code}: {error.details}"
            left = deadline - clock()
            if left <= 0:
                break
            sleep(min(poll_interval, left))
    named = timeout if budget is None else budget
    raise RestartFailed(
        f"CRI on {socket_path} did not answer Version within {named:g}s (last: {last_error})"
    )


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(value, high))


def restart_and_check(restarter: Restarter, *, socket_path: str, timeout: float) -> RuntimeVersion:
    """Restart containerd, then wait for CRI; both share one ``timeout`` budget."""
    started = time.monotonic()
    restarter.restart(timeout=timeout)
    remaining = timeout - (time.monotonic() - started)
    return wait_for_cri(socket_path, timeout=max(remaining, 0.0), budget=timeout)


# --- choosing a strategy --------------------------------------------------------------------


def make_restarter(
    mode: str,
    *,
    command: Sequence[str] = (),
    bus_address: str = DEFAULT_BUS_ADDRESS,
    trigger_dir: Path | None = None,
    root: Path = HOST_ROOT,
) -> Restarter:
    """The :class:`Restarter` for ``--reload MODE`` (with ``none`` nothing restarts and there
    is none). ``command`` is ``--reload-command`` as an argv, ``trigger_dir`` the node's
    ``--restart-trigger-dir`` as reachable from here; the command line checked them."""
    if mode == "command":
        return CommandRestarter(command)
    if mode == "trigger" and trigger_dir is not None:
        return TriggerRestarter(trigger_dir, root=root)
    if mode == "systemd":
        return SystemdRestarter(bus_address=bus_address)
    raise ValueError(f"no containerd restart for --reload {mode}")
