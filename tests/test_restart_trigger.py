"""`--reload trigger`: the agent asks a systemd path unit on the host to restart containerd.

The host side is what daemonset/restart-trigger/host/ ships: the script runs for real under
dash with a stand-in `systemctl` first on PATH; what systemd's `PathChanged=` would do (start
the service when a request is renamed into place) is played by a thread that watches the
request file. The unit files are checked with `systemd-analyze verify`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node_agent.containerd_restart import (
    TRIGGER_DONE,
    TRIGGER_REQUEST,
    TriggerRestarter,
    make_restarter,
)
from node_agent.errors import RestartFailed
from node_agent.settings import Settings

COMPONENT = Path(__file__).resolve().parents[1] / "daemonset" / "restart-trigger"
HOST_SCRIPT = COMPONENT / "host" / "node-agent-restart-containerd"
PATH_UNIT = COMPONENT / "host" / "node-agent-restart-containerd.path"
SERVICE_UNIT = COMPONENT / "host" / "node-agent-restart-containerd.service"


@dataclass
class Host:
    """The node's side: the trigger directory, a `systemctl` that logs its arguments and
    exits with `exit_code` (or runs `restart`, a shell command that really restarts a
    containerd), and (once started) the path unit's stand-in."""

    directory: Path
    bin_dir: Path
    exit_code: int = 0
    restart: str | None = None
    runs: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def systemctl_log(self) -> Path:
        return self.bin_dir / "systemctl.log"

    def write_systemctl(self) -> None:
        systemctl = self.bin_dir / "systemctl"
        last = f"exec {self.restart}" if self.restart else f"exit {self.exit_code}"
        systemctl.write_text(f'#!/bin/sh\necho "$@" >> {self.systemctl_log}\n{last}\n')
        systemctl.chmod(0o755)

    def run_script(self, request: str | None = None) -> subprocess.CompletedProcess[str]:
        if request is not None:
            (self.directory / TRIGGER_REQUEST).write_text(request)
        self.write_systemctl()
        self.runs += 1
        return subprocess.run(
            ["/usr/bin/dash", str(HOST_SCRIPT), str(self.directory)],
            env={"PATH": f"{self.bin_dir}:/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    def start_path_unit(self) -> None:
        """Run the script whenever a new request file is in place (as PathChanged= would)."""

        def watch() -> None:
            seen: int | None = None
            while not self._stop.wait(0.01):
                try:
                    inode = (self.directory / TRIGGER_REQUEST).stat().st_ino
                except FileNotFoundError:
                    continue
                if inode != seen:
                    seen = inode
                    self.run_script()

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    directory, bin_dir = tmp_path / "run-node-agent", tmp_path / "bin"
    directory.mkdir(mode=0o700)
    bin_dir.mkdir()
    node = Host(directory, bin_dir)
    yield node
    node.stop()


# --- the agent's side ----------------------------------------------------------------------


def test_a_restart_is_asked_for_once_and_done_when_the_host_answers_its_token(host: Host) -> None:
    host.start_path_unit()
    TriggerRestarter(host.directory).restart(timeout=5)
    assert host.systemctl_log.read_text() == "restart containerd.service\n"
    request = (host.directory / TRIGGER_REQUEST).read_text()
    assert re.fullmatch(r"[0-9a-f]{32}\n", request)
    assert (host.directory / TRIGGER_DONE).read_text() == f"{request.strip()} 0\n"
    assert oct((host.directory / TRIGGER_REQUEST).stat().st_mode & 0o777) == "0o600"


def test_every_restart_is_a_new_request(host: Host) -> None:
    host.start_path_unit()
    restarter = TriggerRestarter(host.directory)
    restarter.restart(timeout=5)
    restarter.restart(timeout=5)
    assert host.systemctl_log.read_text().count("restart containerd.service") == 2


def test_a_failed_systemctl_is_a_failed_restart_with_its_exit_code(host: Host) -> None:
    host.exit_code = 3
    host.start_path_unit()
    with pytest.raises(RestartFailed, match=r"systemctl restart containerd exited with code 3$"):
        TriggerRestarter(host.directory).restart(timeout=5)


def test_no_unit_on_the_host_is_a_failed_restart_that_names_it(host: Host) -> None:
    with pytest.raises(RestartFailed, match=r"is node-agent-restart-containerd\.path installed"):
        TriggerRestarter(host.directory).restart(timeout=0.3)
    assert (host.directory / TRIGGER_REQUEST).exists()  # asked, nobody answered


def test_an_answer_to_an_older_request_does_not_count(host: Host) -> None:
    (host.directory / TRIGGER_DONE).write_text("0123abcd 0\n")
    with pytest.raises(RestartFailed, match=r"did not restart containerd within 0\.3s"):
        TriggerRestarter(host.directory, new_token=lambda: "4567ef").restart(timeout=0.3)


@pytest.mark.parametrize("answer", ["", "garbage", "4567ef", "4567ef zero", "4567ef 0 extra"])
def test_a_torn_or_odd_answer_is_no_answer(host: Host, answer: str) -> None:
    (host.directory / TRIGGER_DONE).write_text(answer)
    with pytest.raises(RestartFailed, match="did not restart containerd"):
        TriggerRestarter(host.directory, new_token=lambda: "4567ef").restart(timeout=0.2)


def test_a_missing_trigger_directory_is_a_failed_restart(tmp_path: Path) -> None:
    with pytest.raises(RestartFailed, match="cannot ask the host to restart containerd"):
        TriggerRestarter(tmp_path / "absent").restart(timeout=1)


def test_make_restarter_trigger(tmp_path: Path) -> None:
    restarter = make_restarter("trigger", trigger_dir=tmp_path)
    assert repr(restarter) == f"TriggerRestarter({str(tmp_path)!r})"


# --- the host's side -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_text",
    [None, "", "\n", '$(touch "$0.pwned")ab12\n', "ab12; touch x\n", "AB12\n", "ab 12\n"],
    ids=["absent", "empty", "blank", "command substitution", "shell", "upper case", "space"],
)
def test_the_host_script_ignores_anything_but_one_line_of_hex(
    host: Host, request_text: str | None
) -> None:
    result = host.run_script(request_text)
    assert result.returncode == 0
    assert not host.systemctl_log.exists()
    assert not (host.directory / TRIGGER_DONE).exists()
    assert not list(host.directory.parent.rglob("*pwned*"))


def test_the_host_script_answers_a_hex_token_with_systemctls_exit_code(host: Host) -> None:
    result = host.run_script("ab12\n")
    assert result.returncode == 0
    assert host.systemctl_log.read_text() == "restart containerd.service\n"
    assert (host.directory / TRIGGER_DONE).read_text() == "ab12 0\n"


def test_the_host_script_fails_like_systemctl(host: Host) -> None:
    host.exit_code = 5
    result = host.run_script("cafe\n")
    assert result.returncode == 5
    assert (host.directory / TRIGGER_DONE).read_text() == "cafe 5\n"
    assert not (host.directory / "done.tmp").exists()


def test_the_units_watch_the_default_trigger_dir_and_run_the_installed_script() -> None:
    trigger_dir = Settings().restart_trigger_dir
    assert f"PathChanged={trigger_dir / TRIGGER_REQUEST}" in PATH_UNIT.read_text().splitlines()
    exec_start = next(
        line for line in SERVICE_UNIT.read_text().splitlines() if line.startswith("ExecStart=")
    )
    assert exec_start == f"ExecStart=/usr/local/libexec/node-agent-restart-containerd {trigger_dir}"


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (Debian: systemd) is not installed"
    # As installed on a node, under a private root with the targets every unit depends on
    # (a container has no systemd of its own to provide them).
    root = tmp_path / "root"
    unit_dir, libexec = root / "etc/systemd/system", root / "usr/local/libexec"
    unit_dir.mkdir(parents=True)
    libexec.mkdir(parents=True)
    for unit in (PATH_UNIT, SERVICE_UNIT):
        shutil.copy(unit, unit_dir / unit.name)
    shutil.copy(HOST_SCRIPT, libexec / HOST_SCRIPT.name)
    for target in ("sysinit", "basic", "shutdown", "multi-user", "paths"):
        (unit_dir / f"{target}.target").write_text(f"[Unit]\nDescription={target}\n")
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", PATH_UNIT.name, SERVICE_UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
