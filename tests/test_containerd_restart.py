"""Restart strategies, the CRI health wait and the rollback, each against something real:
real commands, a real gRPC server, a fake systemd on a real private dbus-daemon."""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_cri import CONTAINERD_VERSION, FakeCri
from fake_systemd import FakeSystemd, private_bus
from support.waiting import wait_until

from node_agent.containerd_restart import (
    CommandRestarter,
    Restarter,
    SystemdRestarter,
    make_restarter,
    restart_and_check,
    wait_for_cri,
)
from node_agent.errors import RestartFailed

# --- CommandRestarter -----------------------------------------------------------------------


def test_command_that_succeeds() -> None:
    CommandRestarter(["true"]).restart(timeout=5)


def test_command_that_fails_reports_exit_code_and_last_stderr_line() -> None:
    script = "echo 'first line' >&2; echo 'Job for containerd.service failed.' >&2; exit 3"
    with pytest.raises(RestartFailed) as caught:
        CommandRestarter(["sh", "-c", script]).restart(timeout=5)
    message = str(caught.value)
    assert "sh exited with code 3: Job for containerd.service failed." in message
    assert "first line" not in message


def test_command_without_stderr() -> None:
    with pytest.raises(
        RestartFailed, match=re.escape("false exited with code 1: (no output on stderr)")
    ):
        CommandRestarter(["false"]).restart(timeout=5)


def test_huge_stderr_line_is_capped() -> None:
    script = "import sys; sys.stderr.write('x' * 100_000); sys.exit(1)"
    with pytest.raises(RestartFailed) as caught:
        CommandRestarter([sys.executable, "-c", script]).restart(timeout=5)
    assert len(str(caught.value)) < 300


def test_control_characters_in_stderr_are_neutralised() -> None:
    script = r"printf 'bad\033[2Jthing\r\n' >&2; exit 1"
    with pytest.raises(RestartFailed) as caught:
        CommandRestarter(["sh", "-c", script]).restart(timeout=5)
    assert "\033" not in str(caught.value)
    assert "bad?[2Jthing" in str(caught.value)


def test_command_timeout_kills_it() -> None:
    started = time.monotonic()
    with pytest.raises(RestartFailed, match=re.escape("sleep did not finish within 0.3s")):
        CommandRestarter(["sleep", "30"]).restart(timeout=0.3)
    assert time.monotonic() - started < 3


def test_command_timeout_also_kills_grandchildren_holding_stderr(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 30 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    with pytest.raises(RestartFailed, match="did not finish"):
        CommandRestarter(["sh", "-c", script]).restart(timeout=0.5)
    assert time.monotonic() - started < 3
    grandchild = int(pid_file.read_text())
    # SIGKILL is delivered at once, the exit takes a moment on a busy machine.
    wait_until(lambda: not _alive(grandchild), timeout=3.0, what="the grandchild gone")


def _alive(pid: int) -> bool:
    # A killed process stays a zombie until its parent (here: init) reaps it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_missing_program() -> None:
    with pytest.raises(RestartFailed, match="cannot run /nonexistent/restart-containerd"):
        CommandRestarter(["/nonexistent/restart-containerd"]).restart(timeout=5)


def test_empty_command_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        CommandRestarter([])


# --- make_restarter -------------------------------------------------------------------------

BUS = "unix:path=/run/dbus/system_bus_socket"


def test_make_restarter_command_takes_the_argv_as_split_by_the_command_line() -> None:
    argv = ("nsenter", "-t", "1", "-m", "--", "systemctl", "restart", "containerd")
    assert repr(make_restarter("command", command=argv)) == f"CommandRestarter({list(argv)!r})"


def test_make_restarter_systemd() -> None:
    restarter = make_restarter("systemd", bus_address="unix:path=/host/bus")
    assert repr(restarter) == (
        "SystemdRestarter(bus_address='unix:path=/host/bus', unit='containerd.service')"
    )


@pytest.mark.parametrize("mode", ["none", "reboot", "trigger"])
def test_make_restarter_has_nothing_for_none_or_an_unknown_mode(mode: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"no containerd restart for --reload {mode}")):
        make_restarter(mode)  # trigger: without a trigger dir


# --- SystemdRestarter against a fake systemd on a private bus -------------------------------


@pytest.fixture
def bus_address(tmp_path: Path) -> Iterator[str]:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed (Debian package 'dbus')")
    with private_bus(tmp_path) as address:
        yield address


@pytest.fixture
def systemd(bus_address: str) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(bus_address)
    fake.start()
    yield fake
    fake.stop()


def test_systemd_restart_done(systemd: FakeSystemd) -> None:
    SystemdRestarter(bus_address=systemd.bus_address).restart(timeout=5)
    assert systemd.calls == [("Subscribe",), ("RestartUnit", "containerd.service", "replace")]


def test_systemd_restart_waits_for_the_job(systemd: FakeSystemd) -> None:
    systemd.job_seconds = 0.4
    started = time.monotonic()
    SystemdRestarter(bus_address=systemd.bus_address).restart(timeout=5)
    assert time.monotonic() - started >= 0.4


def test_systemd_job_failed(systemd: FakeSystemd) -> None:
    systemd.job_result = "failed"
    with pytest.raises(
        RestartFailed,
        match=re.escape("systemd's restart job for containerd.service ended with 'failed'"),
    ):
        SystemdRestarter(bus_address=systemd.bus_address).restart(timeout=5)
    assert systemd.restart_unit_calls() == [("RestartUnit", "containerd.service", "replace")]


def test_systemd_job_never_finishes(systemd: FakeSystemd) -> None:
    systemd.finish_jobs = False
    started = time.monotonic()
    with pytest.raises(RestartFailed, match=re.escape("did not finish within 0.5s")):
        SystemdRestarter(bus_address=systemd.bus_address).restart(timeout=0.5)
    assert time.monotonic() - started < 2
    assert len(systemd.restart_unit_calls()) == 1


def test_systemd_no_such_unit(systemd: FakeSystemd) -> None:
    restarter = SystemdRestarter(bus_address=systemd.bus_address, unit="kontainerd.service")
    with pytest.raises(RestartFailed) as caught:
        restarter.restart(timeout=5)
    assert str(caught.value) == (
        "systemd refused to restart kontainerd.service: "
        "org.freedesktop.systemd1.NoSuchUnit: Unit kontainerd.service not found."
    )


def test_systemd_job_removed_before_the_reply_is_not_missed(systemd: FakeSystemd) -> None:
    systemd.announce_before_reply = True
    SystemdRestarter(bus_address=systemd.bus_address).restart(timeout=5)


def test_systemd_other_jobs_are_ignored(systemd: FakeSystemd) -> None:
    # The fake announces a failed unrelated job first; only our job's result counts.
    assert systemd.announce_other_jobs
    SystemdRestarter(bus_address=systemd.bus_address).restart(timeout=5)


def test_systemd_signal_from_an_impostor_is_ignored(systemd: FakeSystemd) -> None:
    systemd.impostor_announces = True
    with pytest.raises(RestartFailed, match="did not finish"):
        SystemdRestarter(bus_address=systemd.bus_address).restart(timeout=0.5)


def test_systemd_not_on_the_bus(bus_address: str) -> None:
    with pytest.raises(RestartFailed, match=r"refused .*ServiceUnknown"):
        SystemdRestarter(bus_address=bus_address).restart(timeout=5)


def test_no_bus_socket(tmp_path: Path) -> None:
    address = f"unix:path={tmp_path}/missing"
    with pytest.raises(RestartFailed, match=re.escape(f"cannot talk to systemd on {address}")):
        SystemdRestarter(bus_address=address).restart(timeout=5)


# --- wait_for_cri ---------------------------------------------------------------------------


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    return str(tmp_path / "containerd.sock")


def test_cri_already_up(socket_path: str) -> None:
    fake = FakeCri(socket_path).start()
    try:
        assert wait_for_cri(socket_path, timeout=5) == CONTAINERD_VERSION
    finally:
        fake.stop()


def test_cri_is_asked_once_even_with_no_time_left(socket_path: str) -> None:
    fake = FakeCri(socket_path).start()
    try:
        assert wait_for_cri(socket_path, timeout=0) == CONTAINERD_VERSION
    finally:
        fake.stop()


def test_cri_comes_up_after_a_delay(socket_path: str) -> None:
    servers: list[FakeCri] = []
    starter = threading.Timer(0.5, lambda: servers.append(FakeCri(socket_path).start()))
    started = time.monotonic()
    starter.start()
    try:
        assert wait_for_cri(socket_path, timeout=10) == CONTAINERD_VERSION
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 2.5
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_cri_never_comes_up(socket_path: str) -> None:
    started = time.monotonic()
    with pytest.raises(RestartFailed) as caught:
        wait_for_cri(socket_path, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 1.5
    assert f"CRI on {socket_path} did not answer Version within 0.5s" in str(caught.value)
    assert "UNAVAILABLE" in str(caught.value)


def test_cri_plugin_missing_is_not_healthy(socket_path: str) -> None:
    # containerd up with its CRI plugin failed to load answers UNIMPLEMENTED.
    fake = FakeCri(socket_path, version=None).start()
    try:
        with pytest.raises(RestartFailed, match="UNIMPLEMENTED"):
            wait_for_cri(socket_path, timeout=0.5)
    finally:
        fake.stop()


def test_cri_that_hangs_does_not_overrun_the_timeout(socket_path: str) -> None:
    fake = FakeCri(socket_path, hang=threading.Event()).start()
    started = time.monotonic()
    try:
        with pytest.raises(RestartFailed, match="DEADLINE_EXCEEDED"):
            wait_for_cri(socket_path, timeout=0.5)
        assert time.monotonic() - started < 1.5
    finally:
        fake.stop()


@dataclass
class FakeTime:
    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_cri_poll_uses_the_injected_clock(socket_path: str) -> None:
    fake_time = FakeTime()
    with pytest.raises(RestartFailed):
        wait_for_cri(
            socket_path,
            timeout=1.0,
            poll_interval=0.25,
            clock=fake_time.clock,
            sleep=fake_time.sleep,
        )
    assert fake_time.sleeps == [0.25, 0.25, 0.25, 0.25]


# --- restart_and_check ---------------------------------------------------------------------


@dataclass
class FakeContainerd:
    """A Restarter whose "containerd" is a FakeCri; CRI loads only with the good config."""

    socket_path: str
    config: str = "good"
    restarts: int = 0
    server: FakeCri | None = None

    def restart(self, *, timeout: float) -> None:
        self.restarts += 1
        self.stop()
        version = CONTAINERD_VERSION if self.config == "good" else None
        self.server = FakeCri(self.socket_path, version=version).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def containerd(socket_path: str) -> Iterator[FakeContainerd]:
    fake = FakeContainerd(socket_path)
    yield fake
    fake.stop()


def test_restart_and_check_healthy(containerd: FakeContainerd, socket_path: str) -> None:
    restarter: Restarter = containerd
    assert restart_and_check(restarter, socket_path=socket_path, timeout=5) == CONTAINERD_VERSION
    assert containerd.restarts == 1


def test_restart_and_check_cri_down(containerd: FakeContainerd, socket_path: str) -> None:
    containerd.config = "bad"
    with pytest.raises(RestartFailed, match="UNIMPLEMENTED"):
        restart_and_check(containerd, socket_path=socket_path, timeout=0.5)


def test_restart_and_check_failed_restart_skips_the_health_wait(socket_path: str) -> None:
    started = time.monotonic()
    with pytest.raises(RestartFailed, match="false exited with code 1"):
        restart_and_check(CommandRestarter(["false"]), socket_path=socket_path, timeout=5)
    assert time.monotonic() - started < 1


def test_restart_and_check_shares_one_budget(socket_path: str) -> None:
    # The restart uses up most of the budget; the CRI wait gets only what is left.
    started = time.monotonic()
    with pytest.raises(RestartFailed, match="did not answer Version"):
        restart_and_check(CommandRestarter(["sleep", "0.6"]), socket_path=socket_path, timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 1.6


@pytest.fixture
def cri_without_version(socket_path: str) -> Iterator[str]:
    """containerd up, its CRI plugin down: Version answers UNIMPLEMENTED."""
    fake = FakeCri(socket_path, version=None).start()
    yield socket_path
    fake.stop()


class SlowRestart:
    """A restart that takes a little longer every time, like a real one."""

    def __init__(self) -> None:
        self.calls = 0

    def restart(self, *, timeout: float) -> None:
        self.calls += 1
        time.sleep(0.02 * self.calls)


def test_the_cri_timeout_error_reads_the_same_on_every_retry(cri_without_version: str) -> None:
    """Found by: one restart attempt per interval. The error named the seconds left of the
    budget after the restart ("within 0.191181s"), different every time: each retry was a
    new Event (and a new ERROR log line) instead of a count on the first."""
    restarter = SlowRestart()
    messages = []
    for _ in range(2):
        with pytest.raises(RestartFailed) as failure:
            restart_and_check(restarter, socket_path=cri_without_version, timeout=0.3)
        messages.append(str(failure.value))
    assert messages[0] == messages[1]
    assert "did not answer Version within 0.3s" in messages[0]
