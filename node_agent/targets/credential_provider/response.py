"""The `CredentialProviderResponse` the plugin answers with (credentialprovider.kubelet.k8s.io/v1).

The agent writes it whole: the registries' credentials under `auth`, keyed by the pattern
the kubelet matches images against (Docker Hub as `docker.io`, `*.` wildcards kept), and
the response's own settings (`cacheKeyType: Registry`, `cacheDuration`). The layout is
fixed, because the plugin is a shell script that checks it: `apiVersion` on the second line,
the closing brace alone on the last (docs/node-facts.md#kubelet-credential-provider).

The file is the agent's alone (in its state dir): one that is not a response it can read
(a torn copy restored from a backup, an edit by hand) is rewritten whole, not refused.
"""

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from node_agent.credentials import RegistryAuth
from node_agent.targets import REDACTED, Entry, OneEntryPerRegistry, Skip

API_VERSION: Final = "credentialprovider.kubelet.k8s.io/v1"
KIND: Final = "CredentialProviderResponse"
CACHE_KEY_TYPE: Final = "Registry"

#: A Go `time.Duration` as `metav1.Duration` parses it ("0s", "90s", "1h30m", "250ms").
_GO_DURATION: Final = re.compile(r"0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+")


def valid_cache_duration(text: str) -> bool:
    """Whether `text` is a duration the kubelet can parse."""
    return _GO_DURATION.fullmatch(text) is not None


class ResponseFormat(OneEntryPerRegistry):
    """`NodeFileFormat` for the response file the plugin answers with."""

    name = "credential-provider-response"

    def __init__(self, *, cache_duration: str = "0s") -> None:
        if not valid_cache_duration(cache_duration):
            raise ValueError("cache_duration is not a duration such as 0s, 30s or 5m")
        self.cache_duration = cache_duration

    def desired_entry(self, registry: str, auth: RegistryAuth) -> tuple[str, Entry] | Skip:
        if not auth.has_basic_auth:
            return Skip("the kubelet's credential providers pass only username and password")
        return registry, {"username": auth.username, "password": auth.password}

    def entries(self, text: str | None) -> dict[str, dict[str, Any]]:
        return {key: dict(entry) for key, entry in _auth_in(text).items()}

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        auth = _auth_in(text)
        for key, entry in updates.items():
            if entry is None:
                auth.pop(key, None)
            else:
                auth[key] = dict(entry)
        return self._dump(auth)

    def redact(self, text: str) -> str:
        if _load(text) is None:
            return UNREADABLE
        auth = _auth_in(text)
        return self._dump({key: {name: REDACTED for name in entry} for key, entry in auth.items()})

    def _dump(self, auth: Mapping[str, Mapping[str, Any]]) -> str:
        document = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "cacheKeyType": CACHE_KEY_TYPE,
            "cacheDuration": self.cache_duration,
            "auth": {key: dict(auth[key]) for key in sorted(auth)},
        }
        # ASCII only: the plugin is a shell script, whatever the node's locale.
        return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


#: Shown in a diff instead of a file that is not a readable response (it may hold anything).
UNREADABLE: Final = "(not a readable CredentialProviderResponse: not shown)\n"


def _auth_in(text: str | None) -> dict[str, dict[str, Any]]:
    """The `auth` of a readable response; nothing for a missing or unreadable file."""
    document = None if text is None else _load(text)
    auth = {} if document is None else document.get("auth", {})
    if not isinstance(auth, dict) or not all(isinstance(e, dict) for e in auth.values()):
        return {}
    return auth


def _load(text: str) -> dict[str, Any] | None:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("kind") != KIND:
        return None
    return document
