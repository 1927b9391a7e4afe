"""`node-agent check` for the credential provider: run the installed plugin exactly as the
kubelet does (by its path, a `CredentialProviderRequest` on stdin; here with an empty
environment, so it needs none of the kubelet's) and check its answer field by field.

Only the problems are said, never a value: a wrong password is "r.example.com: not the
credentials of the Secret".
"""

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from node_agent.targets import Entry
from node_agent.targets.credential_provider.response import API_VERSION, KIND

#: The kubelet gives a plugin this long by default before it gives up on the pull.
TIMEOUT_SECONDS: Final = 5.0
_CACHE_KEY_TYPES: Final = frozenset({"Image", "Registry", "Global"})


@dataclass(frozen=True)
class PluginAnswer:
    """How the plugin answered one request."""

    problems: tuple[str, ...]
    image: str

    @property
    def ok(self) -> bool:
        return not self.problems


def request_for(pattern: str) -> bytes:
    """The request the kubelet sends for an image of the registry `pattern` (a `*` label
    stands for any name)."""
    host = ".".join("check" if label == "*" else label for label in pattern.split("."))
    image = f"{host}/node-agent/check:latest"
    body = {"kind": "CredentialProviderRequest", "apiVersion": API_VERSION, "image": image}
    return json.dumps(body, separators=(",", ":")).encode()


def ask_plugin(plugin: Path, expected: Mapping[str, Entry]) -> PluginAnswer:
    """Run `plugin` once, for the first registry of `expected` (its answer serves them all),
    and compare the answer with `expected`, the response's desired entries."""
    pattern = min(expected, default="registry.invalid")
    stdin = request_for(pattern)
    image = json.loads(stdin)["image"]
    try:
        result = subprocess.run(
            [str(plugin)],
            input=stdin,
            capture_output=True,
            env={},
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return PluginAnswer((f"no answer within {TIMEOUT_SECONDS:g}s",), image)
    except OSError as error:
        return PluginAnswer((f"cannot run {plugin}: {error.strerror}",), image)
    if result.returncode != 0:
        said = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["nothing"]
        return PluginAnswer((f"exit {result.returncode}: {said[0]}",), image)
    return PluginAnswer(tuple(answer_problems(result.stdout, expected)), image)


def answer_problems(stdout: bytes, expected: Mapping[str, Entry]) -> list[str]:
    """What the kubelet would reject in the answer, or where it differs from `expected`."""
    try:
        answer = json.loads(stdout)
    except ValueError:
        return ["the answer is not JSON"]
    if not isinstance(answer, dict):
        return ["the answer is not a JSON object"]
    problems = _envelope_problems(answer)
    auth = answer.get("auth")
    if not isinstance(auth, dict):
        return [*problems, "auth is not an object"]
    for pattern in sorted(set(expected) | set(auth)):
        problem = _entry_problem(auth.get(pattern), expected.get(pattern))
        if problem:
            problems.append(f"{pattern}: {problem}")
    return problems


def _envelope_problems(answer: dict[str, Any]) -> list[str]:
    problems = []
    if answer.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion is not the request's ({API_VERSION})")
    if answer.get("kind") != KIND:
        problems.append(f"kind is not {KIND}")
    if answer.get("cacheKeyType") not in _CACHE_KEY_TYPES:
        problems.append("cacheKeyType is none of Image, Registry, Global")
    return problems


def _entry_problem(answered: object, expected: Entry | None) -> str | None:
    if expected is None:
        return "served, but not in the credentials"
    if answered is None:
        return "not served"
    if not isinstance(answered, dict) or set(answered) != {"username", "password"}:
        return "not exactly a username and a password"
    if answered != dict(expected):
        return "not the credentials of the sources"
    return None
