"""What a reconcile pass means for the daemon, beyond its `Outcome`. Pure, except
`read_fingerprint`.

- Which targets got new credentials and which were repaired: a target rewritten although the
  credentials are the ones last applied to it was changed by someone else (drift).
- What the node files hold after a pass (`Settled`), so that a file event caused by the
  agent's own write, or a resync that finds everything as it was left, needs no new pass.
- Which registries a pass wrote where, and how containerd's restart went (`applied_changes`),
  for stuck-pod recovery to judge when they are effective.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from node_agent.atomic import HOST_ROOT, read_snapshot
from node_agent.credentials import Credentials, normalise_registry
from node_agent.errors import WriteFailed
from node_agent.reconcile import Fingerprint, Outcome, PreparedFile, fingerprint
from node_agent.stuck_pods.decisions import AppliedChange, RestartState
from node_agent.targets.credential_provider import ResponseFormat


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


def applied_changes(outcome: Outcome, *, at: float) -> list[AppliedChange]:
    """Every registry entry `outcome` wrote (added, replaced or taken over; not removed), per
    target, finished at `at`."""
    restart = _restart_state(outcome)
    return [
        AppliedChange(
            target=prepared.name,
            registry=registry,
            at=at,
            replaced=change.action != "add",
            restart=_consumer_restart(prepared, outcome, containerd=restart),
        )
        for prepared in outcome.files
        if prepared.name in outcome.written and prepared.node_file.keys_are_registries
        for change in prepared.plan.changes
        if change.action in ("add", "update", "take over")
        and (registry := _registry_of(change.key)) is not None
    ]


def _consumer_restart(
    prepared: PreparedFile, outcome: Outcome, *, containerd: RestartState
) -> RestartState:
    """Whether the file's consumer must restart before it serves the change: containerd for
    config.toml; the kubelet for the credential provider's response, when the registries the
    kubelet asks the plugin about changed in the same pass."""
    if prepared.node_file.restarts_containerd:
        return containerd
    if isinstance(prepared.node_file.format, ResponseFormat) and outcome.kubelet_restart_needed:
        return "owed"
    return "not_needed"


def _restart_state(outcome: Outcome) -> RestartState:
    if outcome.restart is not None:
        return "healthy" if outcome.restart.succeeded else "failed"
    return "owed" if outcome.restart_owed else "not_needed"


def _registry_of(key: str) -> str | None:
    """The registry a node file key names (`https://index.docker.io/v1/` and
    `registry-1.docker.io` both name Docker Hub)."""
    try:
        return normalise_registry(key)
    except ValueError:
        return None
