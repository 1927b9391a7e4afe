"""A fake ``org.freedesktop.systemd1`` on a private dbus-daemon, for SystemdRestarter's tests.

It speaks real D-Bus through jeepney, so the code under test talks to it exactly as it would
to PID 1: ``Subscribe``, then ``RestartUnit(name, mode)`` answered with a job path, then the
``JobRemoved(id, job, unit, result)`` signal; ``GetUnit(name)`` answered with the unit's
object path, whose ``ActiveEnterTimestamp`` property (``Properties.Get``) says when the unit
last became active. Knobs make it fail the job, never finish it,
reject the unit, or let an impostor announce the job.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeepney import (
    DBusAddress,
    HeaderFields,
    MessageType,
    message_bus,
    new_error,
    new_method_return,
    new_signal,
)
from jeepney.io.blocking import DBusConnection, open_dbus_connection

SYSTEMD_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
MANAGER = DBusAddress(MANAGER_PATH, interface=MANAGER_INTERFACE)
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
UNIT_INTERFACE = "org.freedesktop.systemd1.Unit"

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@contextlib.contextmanager
def private_bus(directory: Path) -> Iterator[str]:
    """Run a dbus-daemon with a permissive config under ``directory``; yields its address."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        raise FileNotFoundError("dbus-daemon")
    config = directory / "bus.conf"
    config.write_text(_BUS_CONFIG.format(socket=directory / "bus"))
    process = subprocess.Popen(
        [daemon, "--nofork", "--print-address", f"--config-file={config}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # it warns about fd limits it may not raise in a container
        text=True,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        if not address:
            raise RuntimeError("dbus-daemon printed no address")
        yield address
    finally:
        process.terminate()
        process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def systemd_on_private_bus(directory: Path, **settings: Any) -> Iterator[FakeSystemd]:
    """A started `FakeSystemd` (with `settings`) on its own bus under `directory`; the bus
    socket is `directory / "bus"`. Skips the test where dbus-daemon is not installed."""
    import pytest

    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed (Debian package 'dbus')")
    directory.mkdir(parents=True, exist_ok=True)
    with private_bus(directory) as address:
        systemd = FakeSystemd(address, **settings)
        systemd.start()
        try:
            yield systemd
        finally:
            systemd.stop()


@dataclass
class FakeSystemd:
    """Owns ``org.freedesktop.systemd1`` on ``bus_address`` and serves the Manager methods."""

    bus_address: str
    known_units: frozenset[str] = frozenset({"containerd.service"})
    job_result: str = "done"
    """Result reported in JobRemoved: systemd uses done, failed, timeout, canceled, …"""
    finish_jobs: bool = True
    """False: never emit JobRemoved, as if the restart hung."""
    job_seconds: float = 0.0
    """How long a job "runs" before JobRemoved."""
    announce_before_reply: bool = False
    """Emit JobRemoved before answering RestartUnit (the client must not miss it)."""
    announce_other_jobs: bool = True
    """Also emit JobRemoved(failed) of an unrelated job first (the client must skip it)."""
    impostor_announces: bool = False
    """A different bus client (not systemd) emits JobRemoved(done) for our job instead."""

    active_since: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds each unit last became active (its ActiveEnterTimestamp); a known
    unit not listed was never active (0)."""

    calls: list[tuple[str, ...]] = field(default_factory=list)
    _connection: DBusConnection | None = None
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _subscribers: set[str] = field(default_factory=set)
    _next_job_id: int = 100

    def start(self) -> None:
        self._connection = open_dbus_connection(self.bus_address)
        (reply,) = self._connection.send_and_get_reply(message_bus.RequestName(SYSTEMD_NAME)).body
        assert reply == 1, f"could not own {SYSTEMD_NAME}: {reply}"
        self._thread = threading.Thread(target=self._serve, name="fake-systemd", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._connection is not None:
            self._connection.close()

    def restart_unit_calls(self) -> list[tuple[str, ...]]:
        return [call for call in self.calls if call[0] == "RestartUnit"]

    def _serve(self) -> None:
        assert self._connection is not None
        while not self._stopping.is_set():
            try:
                message = self._connection.receive(timeout=0.05)
            except TimeoutError:
                continue
            if message.header.message_type is MessageType.method_call:
                self._dispatch(self._connection, message)

    def _dispatch(self, bus: DBusConnection, call: Any) -> None:
        fields = call.header.fields
        member = fields.get(HeaderFields.member)
        if fields.get(HeaderFields.interface) == PROPERTIES_INTERFACE and member == "Get":
            self._get_property(bus, call)
            return
        if fields.get(HeaderFields.interface) == MANAGER_INTERFACE and member == "GetUnit":
            self._get_unit(bus, call)
            return
        if fields.get(HeaderFields.interface) != MANAGER_INTERFACE or member not in {
            "Subscribe",
            "RestartUnit",
        }:
            bus.send(new_error(call, "org.freedesktop.DBus.Error.UnknownMethod"))
            return
        self.calls.append((member, *call.body))
        if member == "Subscribe":
            self._subscribers.add(fields[HeaderFields.sender])
            bus.send(new_method_return(call))
        else:
            self._restart_unit(bus, call)

    def _get_unit(self, bus: DBusConnection, call: Any) -> None:
        (unit,) = call.body
        self.calls.append(("GetUnit", unit))
        if unit not in self.known_units:
            bus.send(_no_such_unit(call, unit))
            return
        bus.send(new_method_return(call, "o", (_unit_path(unit),)))

    def _get_property(self, bus: DBusConnection, call: Any) -> None:
        interface, name = call.body
        path = call.header.fields[HeaderFields.path]
        units = {_unit_path(unit): unit for unit in self.known_units}
        if path not in units or (interface, name) != (UNIT_INTERFACE, "ActiveEnterTimestamp"):
            bus.send(new_error(call, "org.freedesktop.DBus.Error.UnknownProperty"))
            return
        microseconds = round(self.active_since.get(units[path], 0.0) * 1_000_000)
        bus.send(new_method_return(call, "v", (("t", microseconds),)))

    def _restart_unit(self, bus: DBusConnection, call: Any) -> None:
        unit, _mode = call.body
        if unit not in self.known_units:
            bus.send(_no_such_unit(call, unit))
            return
        self._next_job_id += 1
        job_id = self._next_job_id
        job_path = f"{MANAGER_PATH}/job/{job_id}"
        reply = new_method_return(call, "o", (job_path,))
        if not self.announce_before_reply:
            bus.send(reply)
        self._finish_job(bus, job_id, job_path, unit)
        if self.announce_before_reply:
            bus.send(reply)

    def _finish_job(self, bus: DBusConnection, job_id: int, job_path: str, unit: str) -> None:
        time.sleep(self.job_seconds)
        if self.impostor_announces:
            with open_dbus_connection(self.bus_address) as impostor:
                impostor.send(_job_removed(job_id, job_path, unit, "done"))
                # A round trip makes sure the bus has routed the signal before we close.
                impostor.send_and_get_reply(message_bus.GetId())
            return
        if not self.finish_jobs or not self._subscribers:
            return  # real systemd only emits job signals once someone has subscribed
        if self.announce_other_jobs:
            other_path = f"{MANAGER_PATH}/job/{job_id + 1000}"
            bus.send(_job_removed(job_id + 1000, other_path, "other.service", "failed"))
        bus.send(_job_removed(job_id, job_path, unit, self.job_result))


def _unit_path(unit: str) -> str:
    """systemd's object path of a unit (its name with `.` escaped as `_2e`)."""
    return f"{MANAGER_PATH}/unit/" + unit.replace(".", "_2e").replace("-", "_2d")


def _no_such_unit(call: Any, unit: str) -> Any:
    return new_error(call, "org.freedesktop.systemd1.NoSuchUnit", "s", (f"Unit {unit} not found.",))


def _job_removed(job_id: int, job_path: str, unit: str, result: str) -> Any:
    return new_signal(MANAGER, "JobRemoved", "uoss", (job_id, job_path, unit, result))
