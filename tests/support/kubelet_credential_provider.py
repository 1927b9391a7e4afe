"""The kubelet's side of the image credential provider, as the tests check against it:
the CredentialProviderConfig validation the kubelet runs at start, the request it sends and
the response it accepts, and running a plugin the way the kubelet does.

Written from the kubelet's source (`pkg/credentialprovider/plugin/config.go`
`validateCredentialProviderConfig`, `plugin.go`, the `credentialprovider.kubelet.k8s.io`
API types); see docs/node-facts.md#kubelet-credential-provider.
"""

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

CONFIG_API_VERSIONS = {
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
}
PROVIDER_API_VERSIONS = {
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
}
CACHE_KEY_TYPES = {"Image", "Registry", "Global"}
#: A CredentialProviderConfig as a node image leaves it, with a provider of its own.
NODE_IMAGE_CONFIG = """\
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider   # the node image's
    matchImages: ["*.dkr.ecr.*.amazonaws.com"]
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
"""
_GO_DURATION = re.compile(r"0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+")


def config_errors(text: str, *, bin_dir: Path | None = None) -> list[str]:
    """What the kubelet would refuse in a CredentialProviderConfig (empty: it starts).
    With `bin_dir`, each provider's executable must be there too."""
    document = yaml.safe_load(text)
    errors: list[str] = []
    if not isinstance(document, dict) or document.get("kind") != "CredentialProviderConfig":
        return ["kind: not CredentialProviderConfig"]
    if document.get("apiVersion") not in CONFIG_API_VERSIONS:
        errors.append("apiVersion: not supported")
    providers = document.get("providers")
    if not isinstance(providers, list) or not providers:
        return [*errors, "providers: at least 1 item is required"]
    seen: set[str] = set()
    for provider in providers:
        errors.extend(_provider_errors(provider, seen, bin_dir))
    return errors


def config_dir_errors(directory: Path) -> list[str]:
    """What the kubelet (1.34+) would refuse in a directory of CredentialProviderConfigs: it
    reads every *.json, *.yaml and *.yml in name order, refuses a provider name found twice,
    and validates the merged providers."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
    if not files:
        return ["no configuration files found in the directory"]
    errors: list[str] = []
    providers: list[Any] = []
    for path in files:
        document = yaml.safe_load(path.read_text())
        if not isinstance(document, dict) or document.get("kind") != "CredentialProviderConfig":
            errors.append(f"{path.name}: kind: not CredentialProviderConfig")
            continue
        providers.extend(document.get("providers") or [])
    names = [str(p.get("name")) for p in providers if isinstance(p, dict)]
    errors += [f"duplicate provider name {n!r}" for n in sorted(set(names)) if names.count(n) > 1]
    merged = {"apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig"}
    return errors + config_errors(yaml.safe_dump({**merged, "providers": providers}))


def _provider_errors(provider: Any, seen: set[str], bin_dir: Path | None) -> list[str]:
    if not isinstance(provider, dict):
        return ["providers[]: not an object"]
    name = provider.get("name")
    errors: list[str] = []
    if not isinstance(name, str) or not name or name in (".", "..") or re.search(r"[/ ]", name):
        errors.append(f"providers.name: invalid: {name!r}")
    elif name in seen:
        errors.append(f"providers.name: duplicate: {name}")
    else:
        seen.add(name)
        if bin_dir is not None and not (bin_dir / name).is_file():
            errors.append(f"providers.name: no executable {name} in {bin_dir}")
    if provider.get("apiVersion") not in PROVIDER_API_VERSIONS:
        errors.append(f"providers.apiVersion: not supported: {provider.get('apiVersion')!r}")
    patterns = provider.get("matchImages")
    if not isinstance(patterns, list) or not patterns:
        errors.append("providers.matchImages: at least 1 item is required")
    else:
        errors.extend(
            f"providers.matchImages: invalid: {p!r}" for p in patterns if not valid_pattern(p)
        )
    duration = provider.get("defaultCacheDuration")
    if not isinstance(duration, str) or not _GO_DURATION.fullmatch(duration):
        errors.append("providers.defaultCacheDuration: required, a duration >= 0")
    return errors


def valid_pattern(pattern: object) -> bool:
    """What `credentialprovider.ParseSchemelessURL` accepts: a host (globs per label allowed),
    an optional port, an optional path."""
    if not isinstance(pattern, str) or not pattern or "://" in pattern:
        return False
    try:
        parts = urlsplit("https://" + pattern)
        port = parts.port  # raises on a bad port
    except ValueError:
        return False
    return bool(parts.hostname) and (port is None or 0 < port < 65536)


def request(image: str, api_version: str = "credentialprovider.kubelet.k8s.io/v1") -> bytes:
    """The request the kubelet writes to the plugin's stdin (Go's encoding/json: compact)."""
    body = {"kind": "CredentialProviderRequest", "apiVersion": api_version, "image": image}
    return json.dumps(body, separators=(",", ":")).encode()


def response_errors(stdout: bytes, *, api_version: str) -> list[str]:
    """What the kubelet would not accept in a plugin's answer to a request of `api_version`
    (empty: it uses the answer)."""
    try:
        document = json.loads(stdout)
    except ValueError:
        return ["stdout: not JSON"]
    if not isinstance(document, dict):
        return ["stdout: not an object"]
    errors: list[str] = []
    if document.get("apiVersion") != api_version:
        errors.append(f"apiVersion: {document.get('apiVersion')!r}, not the request's")
    if document.get("kind") != "CredentialProviderResponse":
        errors.append("kind: not CredentialProviderResponse")
    if document.get("cacheKeyType") not in CACHE_KEY_TYPES:
        errors.append("cacheKeyType: not Image, Registry or Global")
    duration = document.get("cacheDuration")
    if duration is not None and not (
        isinstance(duration, str) and _GO_DURATION.fullmatch(duration)
    ):
        errors.append("cacheDuration: not a duration")
    auth = document.get("auth", {})
    if not isinstance(auth, dict):
        return [*errors, "auth: not an object"]
    for pattern, entry in auth.items():
        if not valid_pattern(pattern):
            errors.append(f"auth: invalid key {pattern!r}")
        if not isinstance(entry, dict) or set(entry) - {"username", "password"}:
            errors.append(f"auth[{pattern!r}]: fields other than username and password")
        elif not all(isinstance(value, str) for value in entry.values()):
            errors.append(f"auth[{pattern!r}]: values are not strings")
    unknown = set(document) - {"apiVersion", "kind", "cacheKeyType", "cacheDuration", "auth"}
    if unknown:
        errors.append(f"unknown fields: {sorted(unknown)}")
    return errors


def run_plugin(
    plugin: Path, stdin: bytes, *, timeout: float = 10.0
) -> subprocess.CompletedProcess[bytes]:
    """Run `plugin` as the kubelet does: by its full path, the request on stdin, here with
    an empty environment (the kubelet passes its own: the plugin must need none of it)."""
    return subprocess.run(
        [str(plugin)], input=stdin, capture_output=True, env={}, timeout=timeout, check=False
    )
