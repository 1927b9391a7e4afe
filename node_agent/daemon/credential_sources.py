"""The daemon's credential sources: the last good credentials of each, merged by priority.

Sources, highest priority first: `--secret` (API), `--secret-file`, then the fallbacks
`--fallback-secret` (API) and `--fallback-secret-file`. Each source remembers the last
credentials it gave that were valid:

- API sources are fed `SecretSnapshot`s by their `SecretWatcher`. The watcher reports only
  what the API confirmed, so an outage never reaches this module; a confirmed deletion means
  "no credentials" (`on_delete="remove"`) or "keep the last ones" (`"keep"`).
- File sources are re-read by the worker (`refresh_files`); unchanged bytes are not parsed
  again.
- Invalid content (unparseable, wrong type, missing file) keeps the last good credentials and
  marks the source invalid until it is valid again.

Until every source has given good credentials or a confirmed absence, `merged()` is None: a
pass without them would remove what a source not read yet may still want (the state of an
earlier run says the agent owns those entries).
"""

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node_agent.credentials import (
    Credentials,
    merge_by_priority,
    parse_document,
    parse_secret_data,
)
from node_agent.errors import InvalidCredentials
from node_agent.kube.model import ObjectRef
from node_agent.kube.secret_watch import SecretContent, SecretSnapshot
from node_agent.secret_files import read_secret_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceChange:
    """What reading one source changed."""

    source: str
    """`namespace/name` or the file path (the `source` metrics label)."""
    credentials_changed: bool
    """The source's credentials (or its known/unknown status) changed: a pass is wanted."""
    new_problem: str | None = None
    """Set when the source turned invalid, or changed to other invalid content. No values."""
    recovered: bool = False
    """The source was invalid and is valid again."""

    @property
    def noteworthy(self) -> bool:
        return self.credentials_changed or self.new_problem is not None or self.recovered


@dataclass
class _Source:
    name: str
    credentials: Credentials | None = None
    """The last good credentials; None: no good content and no confirmed absence yet."""
    problem: str | None = None
    digest: bytes | None = None
    """Of the bytes last read (files only): unchanged bytes are not parsed again."""


def credentials_from_secret(
    ref: ObjectRef, content: SecretContent, warnings: list[str] | None = None
) -> Credentials:
    """The credentials in a Secret's content, validated like a Secret manifest. Raises
    InvalidCredentials naming the Secret and the field, never a value."""
    return parse_secret_data(str(ref), content.type, content.data, warnings)


class CredentialSources:
    """Every configured source's last good credentials. Thread-safe: watchers feed API
    sources from their threads while the worker reads files and merges."""

    def __init__(
        self,
        *,
        secrets: Sequence[ObjectRef] = (),
        files: Sequence[Path] = (),
        fallback_secrets: Sequence[ObjectRef] = (),
        fallback_files: Sequence[Path] = (),
        on_delete: str = "remove",
    ) -> None:
        if on_delete not in ("remove", "keep"):
            raise ValueError(f"on_delete must be remove or keep, not {on_delete!r}")
        self._on_delete = on_delete
        self._lock = threading.Lock()
        self._files = [*files, *fallback_files]
        self._secrets = [*secrets, *fallback_secrets]
        order = [*map(str, secrets), *map(str, files)]
        order += [*map(str, fallback_secrets), *map(str, fallback_files)]
        self._sources = {name: _Source(name) for name in order}
        self._priority = order

    @property
    def names(self) -> list[str]:
        """Every source, highest priority first."""
        return list(self._priority)

    @property
    def secret_refs(self) -> list[ObjectRef]:
        return list(self._secrets)

    @property
    def file_paths(self) -> list[Path]:
        return list(self._files)

    def apply_secret(self, ref: ObjectRef, snapshot: SecretSnapshot) -> SourceChange:
        """Take what the API confirmed about an API source."""
        if snapshot.content is None:
            return self._deleted(str(ref))
        warnings: list[str] = []
        try:
            credentials = credentials_from_secret(ref, snapshot.content, warnings)
        except InvalidCredentials as invalid:
            return self._invalid(str(ref), str(invalid))
        return self._valid(str(ref), credentials, warnings=warnings)

    def refresh_files(self) -> list[SourceChange]:
        """Read every file source again; only the ones that changed are returned."""
        changes = [self._refresh_file(path) for path in self._files]
        return [change for change in changes if change.noteworthy]

    def merged(self) -> Credentials | None:
        """Every source's credentials by priority; None while a source is not known yet."""
        with self._lock:
            known = [self._sources[name].credentials for name in self._priority]
        if any(credentials is None for credentials in known):
            return None
        return merge_by_priority(c for c in known if c is not None)

    def waiting_for(self) -> list[str]:
        """Sources with no good content and no confirmed absence yet."""
        with self._lock:
            return [name for name in self._priority if self._sources[name].credentials is None]

    def problems(self) -> dict[str, str]:
        """Source → why its current content is not used (no values in it)."""
        with self._lock:
            return {
                name: source.problem
                for name, source in self._sources.items()
                if source.problem is not None
            }

    def _refresh_file(self, path: Path) -> SourceChange:
        name = str(path)
        try:
            raw = read_secret_file(path)
        except InvalidCredentials as invalid:
            return self._invalid(name, str(invalid), digest=None)
        digest = hashlib.sha256(raw).digest()
        with self._lock:
            if digest == self._sources[name].digest:
                return SourceChange(name, credentials_changed=False)
        warnings: list[str] = []
        try:
            credentials = parse_document(name, raw, warnings)
        except InvalidCredentials as invalid:
            return self._invalid(name, str(invalid), digest=digest)
        return self._valid(name, credentials, digest=digest, warnings=warnings)

    def _valid(
        self,
        name: str,
        credentials: Credentials,
        digest: bytes | None = None,
        warnings: Sequence[str] = (),
    ) -> SourceChange:
        with self._lock:
            source = self._sources[name]
            changed = source.credentials != credentials
            recovered = source.problem is not None
            source.credentials, source.problem, source.digest = credentials, None, digest
        if recovered:
            log.info("source %s: valid again", name)
        if changed or recovered:  # once per change, not on every relist or resync
            for warning in warnings:
                log.warning("%s", warning)
        return SourceChange(name, credentials_changed=changed, recovered=recovered)

    def _invalid(self, name: str, problem: str, digest: bytes | None = None) -> SourceChange:
        with self._lock:
            source = self._sources[name]
            repeated = source.problem == problem and source.digest == digest
            source.problem, source.digest = problem, digest
        if repeated:
            return SourceChange(name, credentials_changed=False)
        log.warning("source %s: %s; keeping its last good credentials", name, problem)
        return SourceChange(name, credentials_changed=False, new_problem=problem)

    def _deleted(self, name: str) -> SourceChange:
        with self._lock:
            source = self._sources[name]
            before = source.credentials
            keep = self._on_delete == "keep" and before is not None
            source.credentials = before if keep else {}
            source.problem = None
            changed = source.credentials != before
        if keep:
            log.info(
                "source %s: deleted; keeping its last credentials (--on-secret-delete keep)", name
            )
        else:
            log.info("source %s: deleted; its registries are removed from the node", name)
        return SourceChange(name, credentials_changed=changed)
