"""Whether the kubelet runs the CredentialProviderConfig on disk: it reads the file only when
it starts (docs/node-facts.md#kubelet-credential-provider), so it does when it last started
after the file last changed. When the kubelet started is asked of systemd over the host's
system bus (`kubelet.service`'s `ActiveEnterTimestamp`); a node where systemd cannot say
(no bus socket, no such unit) gets no answer, and the caller falls back on what it did itself.
"""

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from node_agent.errors import NodeAgentError
from node_agent.host_paths import resolved_target
from node_agent.systemd_bus import call, manager_call, property_call, remaining

log = logging.getLogger(__name__)

KUBELET_UNIT: Final = "kubelet.service"
_UNIT_INTERFACE: Final = "org.freedesktop.systemd1.Unit"
#: A pass waits for this at most: a node without a system bus must not slow the daemon down.
_TIMEOUT_SECONDS: Final = 1.0

KubeletRestartCheck = Callable[[], bool | None]
"""Whether the kubelet still runs an older CredentialProviderConfig; None: cannot tell."""


def kubelet_started_at(
    bus_address: str, *, unit: str = KUBELET_UNIT, timeout: float = _TIMEOUT_SECONDS
) -> float | None:
    """Wall-clock seconds when `unit` last became active, from systemd; None when systemd
    cannot say (no bus, no such unit, never active)."""
    from jeepney import AuthenticationError  # noqa: PLC0415  (jeepney: only with systemd)
    from jeepney.io.blocking import open_dbus_connection  # noqa: PLC0415
    from jeepney.wrappers import DBusErrorResponse  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    try:
        with open_dbus_connection(bus_address, auth_timeout=remaining(deadline)) as bus:
            (path,) = call(bus, manager_call("GetUnit", "s", (unit,)), deadline)
            entered = property_call(path, _UNIT_INTERFACE, "ActiveEnterTimestamp")
            ((_signature, microseconds),) = call(bus, entered, deadline)
    except (DBusErrorResponse, AuthenticationError, OSError, TimeoutError, ValueError) as error:
        log.debug("systemd did not say when %s started: %s", unit, type(error).__name__)
        return None
    if not isinstance(microseconds, int) or microseconds <= 0:
        return None
    return microseconds / 1_000_000


def kubelet_restart_check(config: Path, *, root: Path, bus_address: str) -> KubeletRestartCheck:
    """The check for the CredentialProviderConfig at `config` (a path under the host root
    `root`): True when the kubelet last started before the file last changed."""

    def check() -> bool | None:
        started = kubelet_started_at(bus_address)
        if started is None:
            return None
        try:
            changed = os.stat(resolved_target(root, config)).st_mtime
        except (OSError, NodeAgentError):
            return None
        return changed > started

    return check
