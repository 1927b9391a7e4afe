"""Credential sources on disk: the thin I/O around `node_agent.credentials`.

A `--secret-file` path is a docker config document, a Secret manifest, or a directory that
is a mounted Secret volume (kubelet publishes its keys as files, swapped through `..data`).
"""

from collections.abc import Sequence
from pathlib import Path

from node_agent.credentials import Credentials, merge_by_priority, parse_document
from node_agent.errors import InvalidCredentials

#: Secret volume keys, in the order they are looked for.
SECRET_VOLUME_KEYS = (".dockerconfigjson", ".dockercfg")


def load_secret_file(path: Path) -> Credentials:
    """Credentials from one `--secret-file` path. Raises InvalidCredentials."""
    source = str(path)
    if path.is_dir():
        return _load_secret_volume(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidCredentials(source, "path", "no such file") from None
    except OSError as error:
        raise InvalidCredentials(source, "path", f"cannot read: {error.strerror}") from None
    return parse_document(source, raw)


def _load_secret_volume(directory: Path) -> Credentials:
    for key in SECRET_VOLUME_KEYS:
        candidate = directory / key
        if candidate.is_file():
            return load_secret_file(candidate)
    raise InvalidCredentials(
        str(directory), "path", "directory has no .dockerconfigjson or .dockercfg"
    )


def load_credentials(
    secret_files: Sequence[Path], fallback_secret_files: Sequence[Path] = ()
) -> Credentials:
    """All file sources merged: `secret_files` in priority order, then the fallbacks, which only
    add registries no higher source names. Every source is read and validated, so one bad
    source fails the whole load and nothing is applied."""
    loaded = [load_secret_file(path) for path in [*secret_files, *fallback_secret_files]]
    return merge_by_priority(loaded)
