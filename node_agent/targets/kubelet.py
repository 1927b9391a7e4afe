"""The kubelet's `config.json` (docker config format, `{"auths": {KEY: ENTRY}}`). Pure.

kubelet reads `auth` (or `username`/`password`) and ignores `identitytoken`, and matches
Docker Hub images only under `docker.io`, `index.docker.io` or `https://index.docker.io/v1/`
(docs/node-facts.md#kubelet-config-json, #kubelet-key-matching). We write Hub under the
docker CLI's key so that a node where someone ran `docker login` is taken over rather than
shadowed.
"""

import json
import re
from collections.abc import Mapping
from typing import Any

from node_agent.credentials import DOCKER_HUB, RegistryAuth
from node_agent.errors import json_position
from node_agent.escaping import without_userinfo
from node_agent.targets import REDACTED, Entry, FormatError, OneEntryPerRegistry, Skip, looks_secret

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
CREDENTIAL_FIELDS = frozenset({"auth", "username", "password", "identitytoken", "registrytoken"})
_DEFAULT_INDENT = "  "
_FIRST_INDENT = re.compile(r"\{\s*?\n([ \t]+)\S")


class KubeletFormat(OneEntryPerRegistry):
    """`NodeFileFormat` for /var/lib/kubelet/config.json."""

    name = "kubelet"

    def desired_entry(self, registry: str, auth: RegistryAuth) -> tuple[str, Entry] | Skip:
        if not auth.has_basic_auth:
            return Skip("kubelet ignores identitytoken-only credentials")
        key = DOCKER_HUB_KEY if registry == DOCKER_HUB else registry
        return key, {"auth": auth.basic_auth_token()}

    def entries(self, text: str | None) -> dict[str, dict[str, Any]]:
        if text is None:
            return {}
        return {key: dict(entry) for key, entry in _auths(_load(text)).items()}

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        if text is not None and not updates:
            return text
        document = _load(text) if text is not None else {}
        auths = document.setdefault("auths", {})
        _auths(document)  # validates the shape before we edit it
        for key, entry in updates.items():
            if entry is None:
                auths.pop(key, None)
            else:
                auths[key] = dict(entry)
        return _dump(document, like=text)

    def redact(self, text: str) -> str:
        document = _load(text)
        auths = _auths(document)
        for entry in auths.values():
            for name in CREDENTIAL_FIELDS & entry.keys():
                entry[name] = REDACTED
        if any(key != without_userinfo(key) for key in auths):
            document["auths"] = {without_userinfo(key): entry for key, entry in auths.items()}
        return _dump(_redacted(document), like=text)


def _redacted(value: Any, *, hide: bool = False) -> Any:
    """`value` with every string under a key that `looks_secret` (or under `HttpHeaders`,
    which docker sends to every registry) replaced by "***". `auths` itself is not hidden
    whole: its entries' credential fields are, their other fields (`email`) stay."""
    if isinstance(value, dict):
        return {key: _redacted(item, hide=hide or _hides(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item, hide=hide) for item in value]
    return REDACTED if hide and isinstance(value, str) else value


def _hides(key: str) -> bool:
    return key != "auths" and (looks_secret(key) or key.lower() == "httpheaders")


def _load(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise FormatError(f"not valid JSON{json_position(error)}; refusing to edit") from None
    if not isinstance(document, dict):
        raise FormatError("top level is not a JSON object; refusing to edit")
    return document


def _auths(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    auths = document.get("auths", {})
    if not isinstance(auths, dict):
        raise FormatError("'auths' is not an object; refusing to edit")
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise FormatError(f'auths["{key}"] is not an object; refusing to edit')
    return auths


def _dump(document: dict[str, Any], *, like: str | None) -> str:
    """JSON in the style of the text it replaces (indent, trailing newline), so a one-entry
    change is a small diff."""
    if like is not None and "\n" not in like.strip():
        compact = ": " not in like
        separators = (",", ":") if compact else (", ", ": ")
        text = json.dumps(document, separators=separators, ensure_ascii=False)
        return text + ("\n" if like.endswith("\n") else "")
    indent = _DEFAULT_INDENT
    if like is not None and (match := _FIRST_INDENT.search(like)):
        indent = match.group(1)
    newline = "\n" if like is None or like.endswith("\n") else ""
    return json.dumps(document, indent=indent, ensure_ascii=False) + newline
