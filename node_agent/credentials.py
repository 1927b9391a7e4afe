"""Registry credentials in: parse docker config documents and Secret manifests, normalise
registry keys, merge sources by priority. Pure: no I/O (see `node_agent.sources`).

Every error names the source and the field, never a value: `InvalidCredentials` messages end
up in logs, events and exit messages.
"""

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from node_agent.errors import InvalidCredentials, json_position
from node_agent.escaping import bounded, printable, shown_key

#: The one name the agent uses for Docker Hub, whatever alias a Secret spells it with.
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

SECRET_TYPE_DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"
SECRET_TYPE_DOCKERCFG = "kubernetes.io/dockercfg"
SECRET_TYPE_OPAQUE = "Opaque"
SECRET_KEY_BY_TYPE = {
    SECRET_TYPE_DOCKERCONFIGJSON: ".dockerconfigjson",
    SECRET_TYPE_DOCKERCFG: ".dockercfg",
}
#: How much of a Secret's `type` an error shows (it is the Secret author's text).
_TYPE_DISPLAY_LIMIT = 80

# host[:port] after scheme and path are gone: DNS labels (kubelet also allows `*` labels),
# an IPv4 address, or a bracketed IPv6 address.
_HOST_PATTERN = re.compile(
    r"^(\[[0-9a-f:.]+\]|[a-z0-9*]([a-z0-9*._-]*[a-z0-9*])?)(:(?P<port>[0-9]{1,5}))?$"
)
_MAX_PORT = 65535


@dataclass(frozen=True)
class RegistryAuth:
    """One registry's credential. Values never show in repr, logs or errors."""

    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    identitytoken: str = field(default="", repr=False)

    @property
    def has_basic_auth(self) -> bool:
        """True when a username/password pair (possibly from `auth`) is present."""
        return bool(self.username or self.password)

    def basic_auth_token(self) -> str:
        """The base64 `user:pass` form docker config files call `auth`."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")


#: Registry name (normalised, see `normalise_registry`) → its credential.
Credentials = dict[str, RegistryAuth]


def normalise_registry(key: str) -> str:
    """The registry a docker config key names: scheme and path stripped, host lower-cased,
    port kept, every Docker Hub alias folded into `docker.io`.

    Raises ValueError (with no value in the message) when no valid host remains.
    """
    host = key.strip()
    scheme_end = host.find("://")
    if scheme_end != -1:
        host = host[scheme_end + 3 :]
    host = host.split("/", 1)[0]
    if not host:
        raise ValueError("empty registry host")
    if "@" in host:
        raise ValueError("user:password@ before the host; credentials belong in the entry")
    # ASCII first: str.lower() maps some other letters to ASCII ones (KELVIN SIGN → "k").
    host = host.lower() if host.isascii() else ""
    # fullmatch: `$` alone also matches before a trailing newline.
    match = _HOST_PATTERN.fullmatch(host)
    if not match:
        raise ValueError("not a valid registry host[:port]")
    if match["port"] is not None and not 0 < int(match["port"]) <= _MAX_PORT:
        raise ValueError(f"port out of range (1-{_MAX_PORT})")
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def parse_document(source: str, raw: bytes, warnings: list[str] | None = None) -> Credentials:
    """Credentials from any document a `--secret-file` may hold: a `.dockerconfigjson`
    document, a legacy `.dockercfg` document, or a Secret manifest (YAML or JSON). What is
    accepted but probably a mistake is appended to `warnings`."""
    document = _load_json_or_yaml(source, raw)
    if not isinstance(document, dict):
        raise InvalidCredentials(source, "document", "expected a JSON or YAML object")
    if "kind" in document or "apiVersion" in document:
        return parse_secret_manifest(source, document, warnings)
    return parse_docker_config(source, document)


def parse_secret_manifest(
    source: str, manifest: Mapping[str, Any], warnings: list[str] | None = None
) -> Credentials:
    """Credentials from a Kubernetes Secret object (manifest or API object as a dict)."""
    if manifest.get("kind") != "Secret":
        raise InvalidCredentials(source, "kind", "expected a Secret")
    keys = {*_map_keys(manifest.get("data")), *_map_keys(manifest.get("stringData"))}
    key = _key_for_type(source, manifest.get("type"), keys, warnings)
    return parse_secret_payload(source, key, _secret_payload(source, manifest, key))


def parse_secret_data(
    source: str,
    secret_type: str,
    data: Mapping[str, bytes],
    warnings: list[str] | None = None,
) -> Credentials:
    """Credentials from a Secret's type and its data, already decoded (what the API gives a
    watcher once base64 is undone)."""
    key = _key_for_type(source, secret_type, set(data), warnings)
    if key not in data:
        raise InvalidCredentials(source, f"data.{key}", "missing")
    return parse_secret_payload(source, key, data[key])


def parse_secret_payload(source: str, key: str, payload: bytes) -> Credentials:
    """The document under a Secret's `.dockerconfigjson` or `.dockercfg` key."""
    document = _load_json(source, key, payload)
    if key == ".dockerconfigjson":
        return parse_dockerconfigjson(f"{source} {key}", document)
    return parse_dockercfg(f"{source} {key}", document)


def _key_for_type(
    source: str, secret_type: object, keys: set[str], warnings: list[str] | None
) -> str:
    """The data key a Secret of `secret_type` keeps its document under. An Opaque Secret
    with a `.dockerconfigjson` key is read as one (said in `warnings`): the content is what
    matters, and `kubectl create secret generic --from-file=.dockerconfigjson=...` without
    `--type` is an easy slip."""
    key = SECRET_KEY_BY_TYPE.get(secret_type) if isinstance(secret_type, str) else None
    if key is not None:
        return key
    dockerconfigjson = SECRET_KEY_BY_TYPE[SECRET_TYPE_DOCKERCONFIGJSON]
    if secret_type == SECRET_TYPE_OPAQUE and dockerconfigjson in keys:
        if warnings is not None:
            warnings.append(
                f"{source}: type: {SECRET_TYPE_OPAQUE}, read as {SECRET_TYPE_DOCKERCONFIGJSON} "
                f"for its {dockerconfigjson} key; give it that type (kubectl create secret "
                "docker-registry, or --type=kubernetes.io/dockerconfigjson)"
            )
        return dockerconfigjson
    raise InvalidCredentials(source, "type", _wrong_type(secret_type))


def _wrong_type(secret_type: object) -> str:
    found = (
        f"found {bounded(printable(secret_type), _TYPE_DISPLAY_LIMIT)}"
        if isinstance(secret_type, str)
        else "no type"
    )
    return (
        f"{found}; expected {SECRET_TYPE_DOCKERCONFIGJSON} or {SECRET_TYPE_DOCKERCFG}: "
        "create it with kubectl create secret docker-registry NAME --docker-server=... "
        "--docker-username=... --docker-password=..."
    )


def _map_keys(value: object) -> list[str]:
    return [key for key in value if isinstance(key, str)] if isinstance(value, dict) else []


def parse_docker_config(source: str, document: Mapping[str, Any]) -> Credentials:
    """A bare docker config document: `{"auths": {...}}` or the legacy map without `auths`
    (whose keys are registries: a misspelt `auths` would be read as a registry named so)."""
    if "auths" in document:
        return parse_dockerconfigjson(source, document)
    _refuse_misspelt_auths(source, document)
    return parse_dockercfg(source, document)


def _refuse_misspelt_auths(source: str, document: Mapping[str, Any]) -> None:
    for key in document:
        if isinstance(key, str) and _looks_like_auths(key):
            raise InvalidCredentials(
                source,
                f'["{shown_key(key)}"]',
                'not a registry: did you mean "auths" (a .dockerconfigjson document is '
                '{"auths": {REGISTRY: ENTRY}})?',
            )


def _looks_like_auths(key: str) -> bool:
    """`auth`, `Auths`, `auths:`, ` auths`...: no registry is named like that, a typo is."""
    return key.strip().strip(":").lower() in {"auth", "auths", "authes", "auts", "auhts"}


def parse_dockerconfigjson(source: str, document: Any) -> Credentials:
    """The `.dockerconfigjson` form: `{"auths": {KEY: ENTRY}}` (other top-level keys ignored)."""
    if not isinstance(document, dict):
        raise InvalidCredentials(source, "document", "expected a JSON object")
    if "auths" not in document:
        near = [key for key in document if isinstance(key, str) and _looks_like_auths(key)]
        hint = f' (found "{shown_key(near[0])}": did you mean "auths"?)' if near else ""
        raise InvalidCredentials(source, "auths", f"missing{hint}")
    return _parse_auth_map(source, "auths", document["auths"])


def parse_dockercfg(source: str, document: Any) -> Credentials:
    """The legacy `.dockercfg` form: `{KEY: ENTRY}`."""
    return _parse_auth_map(source, "", document)


def merge_by_priority(sources: Iterable[Credentials]) -> Credentials:
    """One credential set from sources in priority order: the first source naming a registry
    wins it; later sources (lower priority, then fallbacks) only add registries."""
    merged: Credentials = {}
    for credentials in sources:
        for registry, auth in credentials.items():
            merged.setdefault(registry, auth)
    return merged


def _parse_auth_map(source: str, path: str, auth_map: Any) -> Credentials:
    if not isinstance(auth_map, dict):
        raise InvalidCredentials(source, path or "document", "expected a map of registry → entry")
    credentials: Credentials = {}
    spelling: dict[str, str] = {}
    for key, entry in auth_map.items():
        # Keys are shown escaped and without `user:password@`: they come from the input.
        shown = shown_key(key) if isinstance(key, str) else repr(key)
        field_path = f'{path}["{shown}"]' if path else f'["{shown}"]'
        registry = _registry_from_key(source, field_path, key)
        auth = parse_entry(source, field_path, entry)
        if registry in credentials and credentials[registry] != auth:
            raise InvalidCredentials(
                source,
                field_path,
                f'a different credential for the same registry as ["{spelling[registry]}"]',
            )
        credentials[registry] = auth
        spelling.setdefault(registry, shown)
    return credentials


def _registry_from_key(source: str, field_path: str, key: Any) -> str:
    if not isinstance(key, str):
        raise InvalidCredentials(source, field_path, "registry key must be a string")
    try:
        return normalise_registry(key)
    except ValueError as error:
        raise InvalidCredentials(source, field_path, str(error)) from None


def parse_entry(source: str, field_path: str, entry: Any) -> RegistryAuth:
    """One registry entry. `auth` wins over `username`/`password`, as in kubelet and docker."""
    if not isinstance(entry, dict):
        raise InvalidCredentials(source, field_path, "expected an object")
    for name in ("auth", "username", "password", "identitytoken"):
        if name in entry and not isinstance(entry[name], str):
            raise InvalidCredentials(source, f"{field_path}.{name}", "expected a string")
        if name in entry and not _is_unicode_text(entry[name]):
            # Valid JSON (`"\ud800"`), but no file can hold it as UTF-8.
            raise InvalidCredentials(
                source, f"{field_path}.{name}", "not valid Unicode text (a lone surrogate)"
            )
    identitytoken = entry.get("identitytoken", "")
    if entry.get("auth"):
        username, password = _decode_basic_auth(source, f"{field_path}.auth", entry["auth"])
    else:
        username, password = entry.get("username", ""), entry.get("password", "")
        if username and "password" not in entry:
            raise InvalidCredentials(source, f"{field_path}.password", "missing")
    if not (username or password or identitytoken):
        raise InvalidCredentials(source, field_path, "no auth, username/password or identitytoken")
    return RegistryAuth(username=username, password=password, identitytoken=identitytoken)


def _is_unicode_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_basic_auth(source: str, field_path: str, value: str) -> tuple[str, str]:
    # kubelet accepts padded and unpadded base64: do the same.
    padded = value.strip() + "=" * (-len(value.strip()) % 4)
    try:
        decoded = base64.b64decode(padded, validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, or a non-ASCII `value`
        raise InvalidCredentials(source, field_path, "not valid base64 of UTF-8 text") from None
    username, separator, password = decoded.partition(":")
    if not separator:
        raise InvalidCredentials(source, field_path, "decoded value has no ':' (user:password)")
    if not username:
        raise InvalidCredentials(source, field_path, "decoded value has an empty username")
    return username, password


def _secret_payload(source: str, manifest: Mapping[str, Any], key: str) -> bytes:
    # The API server merges stringData over data; a manifest may carry either.
    string_data = manifest.get("stringData")
    if string_data is not None and not isinstance(string_data, dict):
        raise InvalidCredentials(source, "stringData", "expected a map")
    if string_data and key in string_data:
        value = string_data[key]
        if not isinstance(value, str):
            raise InvalidCredentials(source, f"stringData.{key}", "expected a string")
        return value.encode("utf-8")
    data = manifest.get("data")
    if data is not None and not isinstance(data, dict):
        raise InvalidCredentials(source, "data", "expected a map")
    if not data or key not in data:
        raise InvalidCredentials(source, f"data.{key}", "missing")
    return decode_secret_value(source, f"data.{key}", data[key])


def decode_secret_value(source: str, field_path: str, value: Any) -> bytes:
    """A Secret `data` value: base64 text."""
    if not isinstance(value, str):
        raise InvalidCredentials(source, field_path, "expected a base64 string")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII `value`
        raise InvalidCredentials(source, field_path, "not valid base64") from None


def _load_json(source: str, field_path: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        problem = f"not valid JSON{json_position(error)}"
        raise InvalidCredentials(source, field_path, problem) from None


def _load_json_or_yaml(source: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        as_json = json_position(error)
    try:
        # YAML is a superset of JSON; JSON first only because it is faster and stricter.
        return yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as error:
        problem = f"neither valid JSON{as_json} nor YAML{_yaml_position(error)}"
        raise InvalidCredentials(source, "document", problem) from None


def _yaml_position(error: BaseException) -> str:
    """Like `json_position`, for PyYAML (whose marks count from 0)."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return ""
    return f" (line {mark.line + 1}, column {mark.column + 1})"
