"""What the agent does with config.toml, by the containerd the node runs. Pure.

The one place that knows containerd versions (docs/node-facts.md#containerd-deprecation):
`registry.configs` auth is read up to containerd 2.3; since 2.1 any entry there moves the
node's image pulls off the Transfer Service into local pull mode; containerd's deprecation
table removes it in 2.4, where writing it would be dead config. A containerd that changes
this is one more row in `SUPPORT`.
"""

import enum
import re
from dataclasses import dataclass
from typing import Final


class ConfigTomlAuth(enum.Enum):
    WRITE = "write"
    """containerd reads `registry.configs` auth: keep it in step."""
    WRITE_WITH_WARNING = "write, with a warning"
    """Read, but any entry turns the Transfer Service off (local pull mode)."""
    LEAVE_ALONE = "leave alone"
    """Not read any more: config.toml is left as it is, and the reason reported."""


@dataclass(frozen=True)
class Row:
    since: tuple[int, int]
    """The first (major, minor) the row applies to (until the next row)."""
    auth: ConfigTomlAuth
    why: str


SUPPORT: Final = (
    Row((1, 0), ConfigTomlAuth.WRITE, "containerd reads registry.configs auth"),
    Row(
        (2, 1),
        ConfigTomlAuth.WRITE_WITH_WARNING,
        "containerd 2.1+ reads registry.configs auth, but any registry.configs entry turns "
        "the Transfer Service off (image pulls fall back to local pull mode); the "
        "credential-provider or kubelet target gives credentials without it",
    ),
    Row(
        (2, 4),
        ConfigTomlAuth.LEAVE_ALONE,
        "containerd 2.4+ no longer reads registry.configs (removed after its deprecation): "
        "config.toml is left alone; use the credential-provider or kubelet target",
    ),
)

#: `1.6.20~ds1`, `v2.3.2`, `2.1.0-rc.1`, `1.7.24+unknown`.
_VERSION: Final = re.compile(r"v?(\d+)\.(\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class ContainerdSupport:
    """What to do with config.toml for one containerd."""

    version: str | None
    """As containerd reported it (CRI `Version`); None: it could not be asked."""
    row: Row

    @property
    def auth(self) -> ConfigTomlAuth:
        return self.row.auth

    def describe(self) -> str:
        running = f"containerd {self.version}" if self.version else "containerd (version unknown)"
        return f"{running}: config.toml auth: {self.row.auth.value} ({self.row.why})"


UNKNOWN: Final = ContainerdSupport(None, SUPPORT[0])
"""containerd could not be asked: config.toml is kept as before (a node being set up)."""


def support_for(runtime_version: str | None, table: tuple[Row, ...] = SUPPORT) -> ContainerdSupport:
    """The row of `table` for `runtime_version` (CRI `runtime_version`); an unreadable or
    missing version gets the first row (`UNKNOWN`'s)."""
    match = _VERSION.match(runtime_version or "")
    if match is None:
        return ContainerdSupport(runtime_version or None, table[0])
    version = (int(match[1]), int(match[2]))
    row = next(row for row in reversed(table) if version >= row.since or row is table[0])
    return ContainerdSupport(runtime_version, row)
