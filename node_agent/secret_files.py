"""Credential sources on disk: the thin I/O around `node_agent.credentials`, for the one-shot
commands and the daemon alike.

A `--secret-file` path is a docker config document, a Secret manifest, or a directory that
is a mounted Secret volume (kubelet publishes its keys as files, swapped through `..data`).
"""

import logging
from collections.abc import Sequence
from pathlib import Path

from node_agent.credentials import Credentials, merge_by_priority, parse_document
from node_agent.errors import InvalidCredentials

log = logging.getLogger(__name__)

#: Secret volume keys, in the order they are looked for.
SECRET_VOLUME_KEYS = (".dockerconfigjson", ".dockercfg")


def read_secret_file(path: Path) -> bytes:
    """The bytes of a `--secret-file`: the file, or the key file of a Secret volume directory.
    Raises InvalidCredentials."""
    if path.is_dir():
        key_file = next((path / k for k in SECRET_VOLUME_KEYS if (path / k).is_file()), None)
        if key_file is None:
            raise InvalidCredentials(
                str(path), "path", "directory has no .dockerconfigjson or .dockercfg"
            )
        path = key_file
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidCredentials(str(path), "path", "no such file") from None
    except OSError as error:
        raise InvalidCredentials(str(path), "path", f"cannot read: {error.strerror}") from None


def load_secret_file(path: Path) -> Credentials:
    """Credentials from one `--secret-file` path; what is accepted but probably a mistake is
    logged as a warning. Raises InvalidCredentials."""
    warnings: list[str] = []
    credentials = parse_document(str(path), read_secret_file(path), warnings)
    for warning in warnings:
        log.warning("%s", warning)
    return credentials


def load_credentials(
    secret_files: Sequence[Path], fallback_secret_files: Sequence[Path] = ()
) -> Credentials:
    """All file sources merged: `secret_files` in priority order, then the fallbacks, which only
    add registries no higher source names. Every source is read and validated, so one bad
    source fails the whole load and nothing is applied."""
    loaded = [load_secret_file(path) for path in [*secret_files, *fallback_secret_files]]
    return merge_by_priority(loaded)
