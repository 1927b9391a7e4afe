"""What a reconcile pass means for the daemon, beyond its `Outcome`. Pure, except
`read_fingerprint`.

- Which targets got new credentials and which were repaired: a target rewritten although the
  credentials are the ones last applied to it was changed by someone else (drift).
- What the node files hold after a pass (`Settled`), so that a file event caused by the
  agent's own write, or a resync that finds everything as it was left, needs no new pass.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from node_agent.atomic import HOST_ROOT, read_snapshot
from node_agent.credentials import Credentials
from node_agent.errors import WriteFailed
from node_agent.reconcile import Fingerprint, Outcome, fingerprint


def read_fingerprint(path: Path, *, root: Path = HOST_ROOT) -> Fingerprint | str:
    """The file's fingerprint, or why it cannot be read (never equal to a fingerprint). Never
    waits: a FIFO (or anything else that is not a regular file) where a node file should be
    is reported like a directory, not opened for a read that blocks until a writer comes."""
    try:
        return fingerprint(read_snapshot(path, root=root).content)
    except WriteFailed as error:
        return f"unreadable: {error}"


@dataclass(frozen=True)
class TargetWrite:
    """One node file a pass rewrote."""

    target: str
    path: Path
    registries: tuple[str, ...]
    """The file keys that changed (registry names, never values)."""
    drift: bool
    """The credentials were the ones last applied to this target: someone else changed it."""


@dataclass(frozen=True)
class Settled:
    """The node as a fully successful pass left it: the credentials it applied and every
    file's fingerprint. The same credentials and fingerprints mean the same pass again."""

    credentials: Credentials
    files: Mapping[Path, Fingerprint | str]

    def still_holds(self, credentials: Credentials) -> bool:
        return credentials == self.credentials and all(
            read_fingerprint(path) == expected for path, expected in self.files.items()
        )


def written_targets(
    outcome: Outcome, credentials: Credentials, applied: Mapping[str, Credentials]
) -> list[TargetWrite]:
    """The targets `outcome` rewrote; `applied` holds the credentials each target was last
    brought in sync with."""
    return [
        TargetWrite(
            target=prepared.name,
            path=prepared.node_file.path,
            registries=tuple(change.key for change in prepared.plan.changes),
            drift=applied.get(prepared.name) == credentials,
        )
        for prepared in outcome.files
        if prepared.name in outcome.written
    ]
