"""Bad input, node files (RELIABILITY.md): `node-agent reconcile` on random
config.toml files in unusual layouts (tests/toml_layouts.py: inline tables, dotted keys,
arrays of tables, comments everywhere, CRLF, out-of-order headers, unicode keys) and random
kubelet config.json documents.

Invariants, for every drawn file:

* never a traceback: the CLI returns 0 or 1 (driven in-process, any other exception fails);
* a refusal is clean: one error line naming the file, and nothing on the node changed
  (neither node file, nor the state);
* an apply changes only our entry: `tomllib` (a parser other than the one that edited the
  file) reads the result as the old data plus our `auth` table, and `check` then says in sync;
* giving the registry back (an empty Secret) returns the old data;
* the credential never leaks (the leak audit fixture), also not in the `--dry-run` diff of a
  file that already holds the canary in some odd credential layout.
"""

from __future__ import annotations

import copy
import json
import shutil
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from campaign import CliRun, Tally, campaign, fuzz_settings, run_cli, run_cli_process
from hypothesis import given
from hypothesis import strategies as st
from leak_audit import CANARY_PASSWORD, CANARY_USERNAME, LeakAudit
from support.dockerconfig import basic_auth
from support.node import FOREIGN_JSON, FOREIGN_TOML, NodeTree
from toml_layouts import CRI_BY_VERSION, Table, containerd_data, hosts, toml_documents

REG = "reg.example:5000"
CANARY = {"username": CANARY_USERNAME, "password": CANARY_PASSWORD}
COMMAND = "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_fuzz_node_files.py"

pytestmark = pytest.mark.usefixtures("leak_audit")


@dataclass(repr=False)
class Fuzz:
    """One campaign test's node factory and CLI, counting cases."""

    base: Path
    audit: LeakAudit
    tally: Tally
    number: int = 0

    @contextmanager
    def node(self, *, toml: str | None, json_text: str | None) -> Iterator[NodeTree]:
        """A fresh node for one example, checked for leaks and removed afterwards."""
        self.number += 1
        self.tally.cases += 1
        node = NodeTree.create(self.base / f"example-{self.number}", toml=None, json_text=None)
        for path, text in ((node.config_toml, toml), (node.config_json, json_text)):
            if text is not None:
                path.write_bytes(text.encode())  # as drawn: CRLF stays CRLF
                path.chmod(0o600)  # it may hold the canary already
        self.audit.allow(node.secret)
        guarded = self.audit.guard_node(files=node.targets, state_dir=node.state_dir)
        try:
            yield node
        finally:
            self.audit.check_tree(node.root)
            self.audit.release(guarded, node.secret)
            self.audit.assert_clean()
            shutil.rmtree(node.root)

    def __repr__(self) -> str:
        return f"Fuzz({self.base})"

    def run(self, node: NodeTree, *extra: str) -> CliRun:
        run = run_cli(self.audit, [*extra[:1], *node.flags("--log-level", "debug"), *extra[1:]])
        assert run.code in (0, 1), run.err
        return run


@pytest.fixture
def fuzz(tmp_path: Path, leak_audit: LeakAudit, record_property: Any) -> Iterator[Fuzz]:
    name = "bad input: node files"
    with campaign(record_property, name, command=COMMAND) as tally:
        fuzz = Fuzz(tmp_path, leak_audit, tally)
        yield fuzz


def assert_clean_refusal(run: CliRun, node: NodeTree, before: dict[str, bytes | None]) -> None:
    assert run.code == 1
    assert len(run.error_lines) == 1, run.err
    assert node.contents() == before, "a refusal changed the node"
    assert node.temp_files() == []


# --- config.toml -------------------------------------------------------------------------------


def plugin_of(data: Table) -> str | None:
    version = data.get("version")
    return CRI_BY_VERSION.get(version) if type(version) is int else None


def registry_path_is_tables(data: Table, plugin: str) -> bool:
    node: Any = data
    for name in ("plugins", plugin, "registry", "configs"):
        node = node.get(name, {})
        if not isinstance(node, dict):
            return False
    return all(
        isinstance(config, dict) and isinstance(config.get("auth", {}), dict)
        for config in node.values()
    )


def with_auth(data: Table, plugin: str, auths: dict[str, dict[str, str]]) -> Table:
    expected = copy.deepcopy(data)
    configs = expected
    for name in ("plugins", plugin, "registry", "configs"):
        configs = configs.setdefault(name, {})
    for host, auth in auths.items():
        configs.setdefault(host, {})["auth"] = auth
    return expected


def existing_hosts(data: Table, plugin: str | None) -> list[str]:
    try:
        configs = data["plugins"][plugin]["registry"]["configs"]
    except (KeyError, TypeError):
        return []
    return sorted(configs) if isinstance(configs, dict) else []


def check_config_toml(
    fuzz: Fuzz, document: tuple[Table, str], take_over: bool, dry_run: bool
) -> None:
    data, text = document
    plugin = plugin_of(data)
    secret = {REG: CANARY}
    taken = [h for h in existing_hosts(data, plugin) if h != REG][:1] if take_over else []
    secret.update({host: CANARY for host in taken})
    with fuzz.node(toml=text, json_text=FOREIGN_JSON) as node:
        node.write_secret(secret)
        before = node.contents()
        if dry_run:
            preview = fuzz.run(node, "reconcile", "--dry-run")  # the audit reads the diff
            assert node.contents() == before
            assert preview.code == (0 if "would" in preview.out else 1), preview.err
        run = fuzz.run(node, "reconcile")
        if run.code == 1:
            assert_clean_refusal(run, node, before)
            assert "config.toml" in run.error_lines[0]
            if plugin is None or not registry_path_is_tables(data, plugin):
                fuzz.tally.outcomes["refused (unsupported)"] += 1
                return  # refusing is the only right answer
            fuzz.tally.outcomes["refused (tomlkit)"] += 1
            return
        fuzz.tally.outcomes["applied"] += 1
        assert plugin is not None and registry_path_is_tables(data, plugin)
        result = tomllib.loads(node.config_toml.read_text())
        assert result == with_auth(data, plugin, {host: CANARY for host in secret})
        assert fuzz.run(node, "check").code == 0
        node.write_secret({})
        assert fuzz.run(node, "reconcile").code == 0
        given_back = tomllib.loads(node.config_toml.read_text())
        assert without_empty_registry_tables(given_back, plugin) == without_empty_registry_tables(
            data, plugin
        )
        if given_back != data:
            # By design (containerd.py): an emptied table on the registry path goes too, also
            # one that was there, empty, before: layout, not meaning.
            fuzz.tally.outcomes["given back without an empty registry table"] += 1
        elif not taken and REG not in existing_hosts(data, plugin):
            # Adding a table and removing it again gives back the original bytes. (A value
            # taken over is written back as data: a comment on its line may go.)
            assert node.config_toml.read_bytes() == text.encode()


def without_empty_registry_tables(data: Table, plugin: str) -> Table:
    """`data` less the empty tables along plugins.PLUGIN.registry.configs.HOST."""
    pruned = copy.deepcopy(data)
    chain: list[tuple[dict[str, Any], str]] = []
    node: Any = pruned
    for name in ("plugins", plugin, "registry", "configs"):
        if not isinstance(node.get(name), dict):
            break
        chain.append((node, name))
        node = node[name]
    else:
        for host in [h for h, config in node.items() if config == {}]:
            del node[host]
    for parent, name in reversed(chain):
        if parent[name] == {}:
            del parent[name]
    return pruned


def test_random_config_toml_layouts_are_edited_exactly_or_refused_cleanly(fuzz: Fuzz) -> None:
    @fuzz_settings(quick=60, full=3000)
    @given(toml_documents(containerd_data()), st.booleans(), st.booleans())
    def check(document: tuple[Table, str], take_over: bool, dry_run: bool) -> None:
        check_config_toml(fuzz, document, take_over, dry_run)

    check()


# --- config.json -------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
kubelet_entries = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"auth": st.text(max_size=12), "email": st.text(max_size=8)}
    ),
    json_values,
)


@st.composite
def kubelet_documents(draw: st.DrawFn) -> tuple[Any, str]:
    """(data, text): a config.json that is usually an object with `auths`, in a random
    style (indent, separators, ASCII escapes, trailing newline)."""
    document: Any = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    if draw(st.integers(0, 5)):
        document["auths"] = draw(
            st.dictionaries(st.one_of(hosts, st.text(max_size=10)), kubelet_entries, max_size=3)
            | json_values
        )
    if draw(st.integers(0, 10)) == 0:
        document = draw(json_values)
    indent = draw(st.sampled_from([None, 0, 2, 4, "\t"]))
    separators = draw(st.sampled_from([None, (",", ":")]))
    text = json.dumps(
        document, indent=indent, separators=separators, ensure_ascii=draw(st.booleans())
    )
    return document, text + draw(st.sampled_from(["", "\n", "\r\n", "  \n"]))


def kubelet_is_editable(document: Any) -> bool:
    if not isinstance(document, dict):
        return False
    auths = document.get("auths", {})
    return isinstance(auths, dict) and all(isinstance(e, dict) for e in auths.values())


def check_config_json(fuzz: Fuzz, document: tuple[Any, str]) -> None:
    data, text = document
    with fuzz.node(toml=FOREIGN_TOML, json_text=text) as node:
        node.write_secret({REG: CANARY})
        before = node.contents()
        run = fuzz.run(node, "reconcile")
        if not kubelet_is_editable(data):
            fuzz.tally.outcomes["refused (unsupported)"] += 1
            assert_clean_refusal(run, node, before)
            assert "config.json" in run.error_lines[0]
            return
        fuzz.tally.outcomes["applied"] += 1
        assert run.code == 0, run.err
        expected = copy.deepcopy(data)
        expected.setdefault("auths", {})[REG] = {
            "auth": basic_auth(CANARY_USERNAME, CANARY_PASSWORD)
        }
        assert json.loads(node.config_json.read_text()) == expected
        node.write_secret({})
        assert fuzz.run(node, "reconcile").code == 0
        given_back = json.loads(node.config_json.read_text())
        if "auths" not in data:
            given_back.pop("auths")  # an emptied `auths` stays as {}
        assert given_back == data


def test_random_kubelet_config_json_is_edited_exactly_or_refused_cleanly(fuzz: Fuzz) -> None:
    @fuzz_settings(quick=60, full=2000)
    @given(kubelet_documents())
    def check(document: tuple[Any, str]) -> None:
        check_config_json(fuzz, document)

    check()


# --- as a child: no traceback on stderr -------------------------------------------------------

BROKEN_NODE_FILES = {
    "toml syntax error": ("config.toml", b"version = 2\n[plugins\n"),
    "toml table defined twice": ("config.toml", b"version = 2\n[a.b]\nx = 1\n[a]\n[a]\n"),
    "toml with a BOM": ("config.toml", "\ufeffversion = 2\n".encode()),
    "toml nested 5000 deep": ("config.toml", b"version = 2\na = " + b"[" * 5000 + b"]" * 5000),
    "toml not UTF-8": ("config.toml", b"version = 2\n# \xff\xfe\n"),
    "json entry not an object": ("config.json", b'{"auths": {"r": "not an object"}}'),
    "json nested 100000 deep": ("config.json", b"[" * 100000 + b"]" * 100000),
    "json with a BOM": ("config.json", "\ufeff{}".encode()),
}


@pytest.mark.parametrize("case", list(BROKEN_NODE_FILES))
def test_a_broken_node_file_is_one_error_line_from_the_real_process(
    case: str, tmp_path: Path, leak_audit: LeakAudit, record_property: Any
) -> None:
    name, content = BROKEN_NODE_FILES[case]
    with campaign(record_property, "bad input: node files", command=COMMAND) as tally:
        tally.cases = 1
        node = NodeTree.create(tmp_path / "node")
        node.write_secret({REG: CANARY})
        leak_audit.allow(node.secret)
        leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
        target = node.config_toml if name == "config.toml" else node.config_json
        target.write_bytes(content)
        before = node.contents()
        run = run_cli_process(["reconcile", *node.flags()])
        leak_audit.check_text(run.out + run.err, "agent output")
        assert "Traceback" not in run.err
        assert_clean_refusal(run, node, before)
        assert name in run.error_lines[0]
