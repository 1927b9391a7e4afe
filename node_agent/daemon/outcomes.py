"""What a reconcile pass means for the daemon. Pure, except `read_fingerprint`.

- Which targets got new credentials and which were repaired: a target rewritten although the
  credentials are the ones last applied to it was changed by someone else (drift).
- Whether each target is in sync afterwards, and how many registries it carries.
- What the node files hold afterwards (`Fingerprint`s), so that a file event caused by the
  agent's own write, or a resync that finds everything as it was left, needs no new pass.
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from node_agent.atomic import read_snapshot
from node_agent.credentials import Credentials
from node_agent.errors import WriteFailed
from node_agent.reconcile import Outcome, PreparedFile

Fingerprint = bytes | None
"""sha256 of a file's bytes; None: the file does not exist."""


def fingerprint(content: bytes | None) -> Fingerprint:
    return None if content is None else hashlib.sha256(content).digest()


def read_fingerprint(path: Path) -> Fingerprint | str:
    """The file's fingerprint, or why it cannot be read (never equal to a fingerprint). Never
    waits: a FIFO (or anything else that is not a regular file) where a node file should be
    is reported like a directory, not opened for a read that blocks until a writer comes."""
    try:
        return fingerprint(read_snapshot(path).content)
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
            target=prepared.node_file.name,
            path=prepared.node_file.path,
            registries=tuple(change.key for change in prepared.plan.changes),
            drift=applied.get(prepared.node_file.name) == credentials,
        )
        for prepared in outcome.files
        if prepared.needs_write
    ]


def in_sync_after(outcome: Outcome, *, written: bool) -> dict[str, bool]:
    """Per target: does the file carry the desired state (and, for containerd, is it
    running with it)? `written`: the pass wrote what it planned (reconcile, not inspect)."""
    return {
        prepared.node_file.name: (written or prepared.plan.in_sync)
        and not (prepared.node_file.restarts_containerd and outcome.restart_pending)
        for prepared in outcome.files
    }


def managed_registries(outcome: Outcome) -> dict[str, int]:
    return {prepared.node_file.name: prepared.desired_count for prepared in outcome.files}


def fingerprints_after(outcome: Outcome, *, written: bool) -> dict[Path, Fingerprint]:
    """Each node file's fingerprint once `outcome`'s writes (if `written`) are done."""
    return {
        prepared.snapshot.path: fingerprint(_content_after(prepared, written=written))
        for prepared in outcome.files
    }


def _content_after(prepared: PreparedFile, *, written: bool) -> bytes | None:
    if written and prepared.needs_write and prepared.new_text is not None:
        return prepared.new_text.encode("utf-8")
    return prepared.snapshot.content
