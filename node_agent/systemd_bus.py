"""Asking systemd over the host's system bus (D-Bus, through jeepney): the calls the
containerd restart and the kubelet's start time share (docs/node-facts.md#restart-over-dbus).

jeepney is imported inside the functions: only a node that talks to systemd loads it.
"""

import time
from typing import Any, Final

from node_agent.escaping import bounded

SYSTEMD_BUS_NAME: Final = "org.freedesktop.systemd1"
SYSTEMD_PATH: Final = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER: Final = "org.freedesktop.systemd1.Manager"
_MAX_DBUS_MESSAGE: Final = 200


def manager_call(method: str, signature: str | None = None, body: tuple[Any, ...] = ()) -> Any:
    """A method call to systemd's manager object."""
    from jeepney import DBusAddress, new_method_call  # noqa: PLC0415

    manager = DBusAddress(SYSTEMD_PATH, bus_name=SYSTEMD_BUS_NAME, interface=SYSTEMD_MANAGER)
    return new_method_call(manager, method, signature, body)


def property_call(path: str, interface: str, name: str) -> Any:
    """`org.freedesktop.DBus.Properties.Get(interface, name)` on systemd's object `path`."""
    from jeepney import DBusAddress, new_method_call  # noqa: PLC0415

    target = DBusAddress(
        path, bus_name=SYSTEMD_BUS_NAME, interface="org.freedesktop.DBus.Properties"
    )
    return new_method_call(target, "Get", "ss", (interface, name))


def call(bus: Any, message: Any, deadline: float) -> tuple[Any, ...]:
    """Send `message` and wait for its reply's body until `deadline` (monotonic); a D-Bus
    error reply raises `DBusErrorResponse`, the deadline `TimeoutError`."""
    from jeepney.wrappers import unwrap_msg  # noqa: PLC0415

    reply = bus.send_and_get_reply(message, timeout=remaining(deadline))
    body: tuple[Any, ...] = unwrap_msg(reply)  # raises DBusErrorResponse for error replies
    return body


def remaining(deadline: float) -> float:
    """Seconds until `deadline`; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def dbus_error_text(error: Any) -> str:
    """``Name: message`` of a D-Bus error reply, capped: the text comes from another process."""
    detail = error.data[0] if error.data and isinstance(error.data[0], str) else ""
    text = f"{error.name}: {detail}" if detail else str(error.name)
    return bounded(text, _MAX_DBUS_MESSAGE)
