"""Node file formats. One module per format, each a pure implementation of `NodeFileFormat`.

A format knows how to read the registry entries out of a file's text and how to render the
text with some entries replaced or removed, changing nothing else. It never does I/O:
`node_agent.reconcile` decides what to change, and reads and writes the files through
`node_agent.atomic`.
"""

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from node_agent.credentials import Credentials, RegistryAuth

#: The fields of one registry entry exactly as the node file stores them
#: (e.g. {"username": "u", "password": "p"} for containerd, {"auth": "dTpw"} for kubelet).
Entry = Mapping[str, Any]


#: Shown instead of a credential value in diffs.
REDACTED: Final = "***"
#: Names of keys whose values a diff never shows, wherever they stand in a file.
_SECRET_LOOKING_NAME: Final = re.compile(
    r"auth|token|passw|passphrase|secret|credential|cookie|private", re.I
)


def looks_secret(name: str) -> bool:
    """Whether a key named `name` probably holds a credential (`Authorization`, `password`,
    `identitytoken`, `client_secret`...): its value is redacted in every diff."""
    return _SECRET_LOOKING_NAME.search(name) is not None


class FormatError(Exception):
    """The text cannot be read or edited safely. The message names the problem, never a value.

    The applier turns it into `UnsupportedConfig` with the file's path.
    """


@dataclass(frozen=True)
class Skip:
    """A credential this file cannot use; `reason` is shown as a warning (no values in it)."""

    reason: str


@dataclass(frozen=True)
class Desired:
    """What one file should hold for a set of credentials."""

    entries: dict[str, Entry] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    """One warning per credential the file cannot use (`registry: skipped: reason`)."""
    registries: int = 0
    """How many registries the entries serve."""


class OneEntryPerRegistry(ABC):
    """For a format that holds one entry per registry: `desired_entries` from the format's
    `desired_entry(registry, auth)`."""

    @abstractmethod
    def desired_entry(self, registry: str, auth: RegistryAuth) -> tuple[str, Entry] | Skip:
        """The key and entry for `registry`, or why the file cannot hold one."""

    def desired_entries(
        self, credentials: Credentials, current: Mapping[str, Mapping[str, Any]]
    ) -> Desired:
        entries: dict[str, Entry] = {}
        skipped: list[str] = []
        for registry in sorted(credentials):
            result = self.desired_entry(registry, credentials[registry])
            if isinstance(result, Skip):
                skipped.append(f"{registry}: skipped: {result.reason}")
                continue
            key, entry = result
            entries[key] = entry
        return Desired(entries, tuple(skipped), registries=len(entries))


class NodeFileFormat(Protocol):
    """What every node file format offers. All methods are pure and deterministic."""

    #: Short name used in metrics labels, the state file and messages ("containerd",
    #: "kubelet", "credential-provider-response", ...).
    name: str

    def desired_entries(
        self, credentials: Credentials, current: Mapping[str, Mapping[str, Any]]
    ) -> Desired:
        """The entries this file should hold for `credentials` (registries normalised, see
        `node_agent.credentials.normalise_registry`), given the `current` ones."""
        ...

    def entries(self, text: str | None) -> dict[str, dict[str, Any]]:
        """The registry entries in `text` (None = file missing), by the key the file uses.

        Raises FormatError when the text is not a file this format can edit.
        """
        ...

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        """`text` with each key in `updates` set to its entry, or removed when None.

        Everything not named in `updates` is preserved (byte-for-byte where the format allows).
        `render(text, {})` returns `text` unchanged, except in a file the agent writes whole
        (the credential provider's response and plugin), whose own settings it brings up to
        date. A None `text` means the file does not exist yet: the result is a new, minimal,
        valid file. Raises FormatError.
        """
        ...

    def redact(self, text: str) -> str:
        """`text` with every credential value (username, password, auth, identitytoken,
        registrytoken) of every registry entry, every HTTP header value, and the value of
        every key that `looks_secret`, replaced by "***", for showing diffs."""
        ...
