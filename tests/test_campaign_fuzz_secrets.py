"""Bad input, Secrets (RELIABILITY.md): `node-agent reconcile` fed random bytes,
random JSON and YAML, docker config documents and Secret manifests with random keys and
entries, unicode hosts, huge and deeply nested documents, and 10,000 registries.

Invariants, for every payload:

* never a traceback: the CLI returns 0 or 1 (driven in-process: any other exception fails
  the test; a few as a child process, whose stderr must hold no traceback);
* a refusal is clean: one error line naming the Secret file, nothing on the node changed;
* an apply is sane: both files parse, `check` says in sync, every key written is a plain
  ASCII `host[:port]` (or kubelet's Docker Hub key), and every foreign entry is either intact
  or taken over with its old value remembered in the state;
* the credential never leaks (the leak audit fixture).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from campaign import CliRun, Tally, campaign, fuzz_settings, is_full_scale, run_cli, run_cli_process
from hypothesis import given
from hypothesis import strategies as st
from leak_audit import CANARY_PASSWORD, CANARY_TOKEN, CANARY_USERNAME, LeakAudit
from support.dockerconfig import basic_auth
from support.node import CRI, FOREIGN_JSON_AUTHS, FOREIGN_TOML_AUTHS, NodeTree

COMMAND = "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_fuzz_secrets.py"
CAMPAIGN = "bad input: Secrets"
KUBELET_HUB_KEY = "https://index.docker.io/v1/"
HOST_KEY = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9*]([a-z0-9*._-]*[a-z0-9*])?)(:[0-9]{1,5})?")

pytestmark = pytest.mark.usefixtures("leak_audit")


@dataclass(repr=False)
class SecretFuzz:
    """Fresh foreign nodes, one per payload; counts cases and outcomes."""

    base: Path
    audit: LeakAudit
    tally: Tally
    number: int = 0

    @contextmanager
    def node(self) -> Iterator[NodeTree]:
        self.number += 1
        self.tally.cases += 1
        node = NodeTree.create(self.base / f"payload-{self.number}")
        self.audit.allow(node.secret)
        guarded = self.audit.guard_node(files=node.targets, state_dir=node.state_dir)
        try:
            yield node
        finally:
            self.audit.check_tree(node.root)
            self.audit.release(guarded, node.secret)
            self.audit.assert_clean()
            shutil.rmtree(node.root)

    def apply(self, payload: bytes) -> None:
        """Reconcile `payload` as the Secret file of a fresh node; check the invariants."""
        with self.node() as node:
            node.write_secret_bytes(payload)
            before = node.contents()
            run = run_cli(self.audit, ["reconcile", *node.flags("--log-level", "debug")])
            assert run.code in (0, 1), run.err
            if run.code == 1:
                self.tally.outcomes["refused"] += 1
                assert_clean_refusal(run, node, before)
                return
            self.tally.outcomes["applied"] += 1
            assert_sane_apply(self.audit, node)


@pytest.fixture
def fuzz(tmp_path: Path, leak_audit: LeakAudit, record_property: Any) -> Iterator[SecretFuzz]:
    with campaign(record_property, CAMPAIGN, command=COMMAND) as tally:
        fuzz = SecretFuzz(tmp_path, leak_audit, tally)
        yield fuzz


def assert_clean_refusal(run: CliRun, node: NodeTree, before: dict[str, bytes | None]) -> None:
    assert len(run.error_lines) == 1, run.err
    assert str(node.secret) in run.error_lines[0]
    assert node.contents() == before, "a refused Secret changed the node"


def assert_sane_apply(audit: LeakAudit, node: NodeTree) -> None:
    toml = tomllib.loads(node.config_toml.read_text())
    configs = toml["plugins"][CRI]["registry"].get("configs", {})
    kubelet = json.loads(node.config_json.read_text())["auths"]
    state = (
        json.loads((node.state_dir / "owned.json").read_text())
        if node.contents()["owned.json"]
        else {"owned": {}}
    )
    owned = state["owned"]
    for name, keys in owned.items():
        for key in keys:
            assert key == KUBELET_HUB_KEY or HOST_KEY.fullmatch(key), f"{name} key {key!r}"
    # containerd has no wildcards, and its 1.6/1.7 parser cannot load an IPv6 key.
    assert not [host for host in configs if "*" in host or host.startswith("[")]
    for host, auth in FOREIGN_TOML_AUTHS.items():
        previous = owned.get("containerd", {})
        assert (previous[host] if host in previous else configs[host]["auth"]) == auth
    for key, auth in FOREIGN_JSON_AUTHS.items():
        previous = owned.get("kubelet", {})
        assert (previous[key] if key in previous else kubelet[key]) == auth
    check = run_cli(audit, ["check", *node.flags()])
    assert check.code == 0, check.out


# --- strategies --------------------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=16)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)
valid_registry_keys = st.from_regex(
    r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,2}(:[0-9]{1,5})?", fullmatch=True
)
registry_keys = st.one_of(
    valid_registry_keys,
    valid_registry_keys,
    st.sampled_from(
        [
            "reg.example:5000",
            "https://reg.example:5000/v2/",
            "REG.Example",
            "docker.io",
            "https://index.docker.io/v1/",
            "registry-1.docker.io",
            "*.example.com",
            "[::1]:5000",
            "127.0.0.1:5000",
            "http://",
            "",
            "reg.example\n/path",
            "\u212aeg.example",
            "régistry.example",
            "\uff52\uff45\uff47.example",  # fullwidth letters
            "xn--rgistry-fya.example",
        ]
    ),
    st.from_regex(r"(https?://)?[a-z0-9.-]{1,20}(:[0-9]{1,6})?(/[a-z0-9/]{0,10})?", fullmatch=True),
    texts,
)
auth_fields = st.one_of(
    st.just(basic_auth(CANARY_USERNAME, CANARY_PASSWORD)),
    st.just(CANARY_TOKEN),
    st.binary(max_size=24).map(lambda raw: base64.b64encode(raw).decode()),
    texts,
)
valid_entries = st.one_of(
    st.fixed_dictionaries(
        {"username": st.one_of(st.just(CANARY_USERNAME), texts), "password": texts}
    ).filter(lambda entry: entry["username"] or entry["password"]),
    st.fixed_dictionaries({"auth": st.just(CANARY_TOKEN)}),
)
entries = st.one_of(
    valid_entries,
    valid_entries,
    st.fixed_dictionaries(
        {},
        optional={
            "auth": auth_fields,
            "username": st.one_of(st.just(CANARY_USERNAME), texts),
            "password": st.one_of(st.just(CANARY_PASSWORD), texts),
            "identitytoken": texts,
            "email": texts,
        },
    ),
    json_values,
)
docker_configs = st.one_of(
    st.dictionaries(valid_registry_keys, valid_entries, max_size=4),  # mostly applied
    st.dictionaries(registry_keys, entries, max_size=4),  # mostly refused
)


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """A Secret file: a docker config (with or without `auths`) or a Secret manifest, as JSON
    or YAML, sometimes damaged."""
    auths = draw(docker_configs)
    shape = draw(st.sampled_from(["dockerconfigjson", "dockercfg", "manifest", "raw"]))
    document: Any
    if shape == "dockerconfigjson":
        document = {"auths": auths, **draw(st.dictionaries(texts, json_values, max_size=2))}
    elif shape == "dockercfg":
        document = auths
    elif shape == "raw":
        document = draw(json_values)
    else:
        inner = json.dumps({"auths": auths}).encode()
        if draw(st.integers(0, 4)) == 0:
            inner = draw(st.binary(max_size=64))
        secret_type = draw(
            st.sampled_from(
                ["kubernetes.io/dockerconfigjson", "kubernetes.io/dockercfg", "Opaque", None]
            )
        )
        key = ".dockercfg" if secret_type == "kubernetes.io/dockercfg" else ".dockerconfigjson"
        if secret_type == "kubernetes.io/dockercfg":
            inner = json.dumps(auths).encode()
        document = {"apiVersion": "v1", "kind": draw(st.sampled_from(["Secret", "ConfigMap"]))}
        if secret_type is not None:
            document["type"] = secret_type
        if draw(st.booleans()):
            document["data"] = {key: base64.b64encode(inner).decode()}
        else:
            document["stringData"] = {key: inner.decode("utf-8", "replace")}
    if draw(st.booleans()):
        text = yaml.safe_dump(document, allow_unicode=draw(st.booleans()))
    else:
        text = json.dumps(document, ensure_ascii=draw(st.booleans()))
    raw = text.encode()
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut]
    return raw


# --- campaigns ---------------------------------------------------------------------------------


def test_random_bytes_are_refused_cleanly(fuzz: SecretFuzz) -> None:
    @fuzz_settings(quick=40, full=1500)
    @given(st.binary(max_size=512))
    def check(payload: bytes) -> None:
        fuzz.apply(payload)

    check()


def test_random_json_is_applied_sanely_or_refused_cleanly(fuzz: SecretFuzz) -> None:
    @fuzz_settings(quick=40, full=1500)
    @given(json_values)
    def check(document: Any) -> None:
        fuzz.apply(json.dumps(document).encode())

    check()


def test_random_docker_configs_and_manifests_are_applied_sanely_or_refused_cleanly(
    fuzz: SecretFuzz,
) -> None:
    @fuzz_settings(quick=80, full=4000)
    @given(payloads())
    def check(payload: bytes) -> None:
        fuzz.apply(payload)

    check()


def yaml_alias_bomb() -> bytes:
    """Nine levels of nine aliases: 9**9 strings if anything expanded it."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    lines.append("auths: {r.example: *i}")
    return "\n".join(lines).encode()


HOSTILE_PAYLOADS: dict[str, bytes] = {
    "JSON nested 100000 deep": b'{"auths": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "YAML nested 10000 deep": b"auths:\n  r:\n    x: " + b"[" * 10000 + b"]" * 10000,
    "YAML alias bomb": yaml_alias_bomb(),
    "YAML python tag": b"auths: !!python/object/apply:os.system ['true']\n",
    "YAML two documents": b"auths: {}\n---\nauths: {}\n",
    "YAML binary and timestamps": b"auths:\n  r.example: {auth: !!binary aGk=, email: 2001-12-14}",
    "a 4 MiB password": json.dumps(
        {"auths": {"reg.example": {"username": "u", "password": "p" * (4 << 20)}}}
    ).encode(),
    "a 1 MiB registry name": json.dumps(
        {"auths": {"r" * (1 << 20): {"username": "u", "password": "p"}}}
    ).encode(),
    "NUL bytes": b'{"auths": {"reg.example": {"username": "u\\u0000", "password": "p\\u0000"}}}',
    "UTF-16": json.dumps({"auths": {}}).encode("utf-16"),
    "a BOM": b'\xef\xbb\xbf{"auths": {}}',
    "empty": b"",
    "a non-ASCII auth": '{"auths": {"reg.example": {"auth": "\u00e9t\u00e9"}}}'.encode(),
    "a non-ASCII Secret data value": json.dumps(
        {
            "kind": "Secret",
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": "\u00e9"},
        }
    ).encode(),
    "a newline before the path": json.dumps(
        {"auths": {"https://reg.example\n/v2/": {"username": "u", "password": "p"}}}
    ).encode(),
    "KELVIN SIGN in the host": json.dumps(
        {"auths": {"\u212aeg.example": {"username": "u", "password": "p"}}}
    ).encode(),
    "the canary as a registry key's password": json.dumps(
        {"auths": {f"https://u:{CANARY_PASSWORD}@reg.example/v2/": {"auth": CANARY_TOKEN}}}
    ).encode(),
    "the canary as a registry key's password, with a slash": json.dumps(
        {"auths": {f"u:{CANARY_PASSWORD}/x@reg.example": {"auth": CANARY_TOKEN}}}
    ).encode(),
    "a lone surrogate in the password": json.dumps(
        {"auths": {"reg.example": {"username": "u", "password": CANARY_PASSWORD + "\ud800"}}}
    ).encode(),
    "a lone surrogate in the registry key": json.dumps(
        {"auths": {"reg\udc00.example": {"auth": CANARY_TOKEN}}}
    ).encode(),
    "IPv6 registry keys": json.dumps(
        {"auths": {k: {"auth": CANARY_TOKEN} for k in ("[::1]:5000", "https://[fd00::1]/v2/")}}
    ).encode(),
    "wildcard registry keys": json.dumps(
        {"auths": {k: {"auth": CANARY_TOKEN} for k in ("*.example.com", "*", "*.*")}}
    ).encode(),
    "a port out of range": json.dumps(
        {"auths": {"reg.example:99999": {"auth": CANARY_TOKEN}}}
    ).encode(),
    "an escape sequence in the registry key": json.dumps(
        {"auths": {"reg\x1b[2J.example": {"auth": CANARY_TOKEN}}}
    ).encode(),
    "base64 of the canary without user": json.dumps(
        {"auths": {"reg.example": {"auth": base64.b64encode(CANARY_PASSWORD.encode()).decode()}}}
    ).encode(),
}


@pytest.mark.parametrize("case", list(HOSTILE_PAYLOADS))
def test_hostile_documents_are_applied_sanely_or_refused_cleanly(
    case: str, fuzz: SecretFuzz
) -> None:
    fuzz.apply(HOSTILE_PAYLOADS[case])


def test_10000_registries_are_applied_and_given_back(
    tmp_path: Path, leak_audit: LeakAudit, record_property: Any
) -> None:
    count = 10_000 if is_full_scale() else 1_000
    with campaign(record_property, CAMPAIGN, command=COMMAND) as tally:
        tally.cases = 1
        node = NodeTree.create(tmp_path / "node")
        leak_audit.allow(node.secret)
        leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
        auths = {
            f"r{i}.example:5000": {"username": CANARY_USERNAME, "password": CANARY_PASSWORD}
            for i in range(count)
        }
        node.write_secret(auths)
        started = time.monotonic()
        assert run_cli(leak_audit, ["reconcile", *node.flags()]).code == 0
        applied = time.monotonic() - started
        configs = tomllib.loads(node.config_toml.read_text())["plugins"][CRI]["registry"]["configs"]
        assert len(configs) == count + len(FOREIGN_TOML_AUTHS) + 1  # + the tls-only host
        assert len(json.loads(node.config_json.read_text())["auths"]) == count + 2
        assert_sane_apply(leak_audit, node)
        original = NodeTree.create(tmp_path / "original")
        node.write_secret({})
        started = time.monotonic()
        assert run_cli(leak_audit, ["reconcile", *node.flags()]).code == 0
        given_back = time.monotonic() - started
        assert node.config_toml.read_bytes() == original.config_toml.read_bytes()
        assert json.loads(node.config_json.read_text()) == json.loads(
            original.config_json.read_text()
        )
        tally.notes.append(
            f"{count} registries: applied in {applied:.1f}s, given back in {given_back:.1f}s"
        )


@pytest.mark.parametrize(
    "payload",
    [b"\x00\xff garbage", b"{oops", b'{"auths": {"r\\n/x": {"auth": "???"}}}'],
    ids=["binary", "broken JSON", "bad host and auth"],
)
def test_a_bad_secret_is_one_error_line_from_the_real_process(
    payload: bytes, tmp_path: Path, leak_audit: LeakAudit, record_property: Any
) -> None:
    with campaign(record_property, CAMPAIGN, command=COMMAND) as tally:
        tally.cases = 1
        node = NodeTree.create(tmp_path / "node")
        node.write_secret_bytes(payload)
        leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
        before = node.contents()
        run = run_cli_process(["reconcile", *node.flags()])
        leak_audit.check_text(run.out + run.err, "agent output")
        assert run.code == 1
        assert "Traceback" not in run.err
        assert_clean_refusal(run, node, before)
