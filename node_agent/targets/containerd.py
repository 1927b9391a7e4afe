"""containerd's `/etc/containerd/config.toml`, registry auth tables only. Pure.

The entries are the `auth` tables under the CRI registry of the file's config version
(docs/node-facts.md#containerd-auth-location):
`plugins."io.containerd.grpc.v1.cri".registry.configs."HOST".auth` for `version = 2`,
`plugins."io.containerd.cri.v1.images".registry.configs."HOST".auth` for `version = 3`.
Files without a version (the v1 layout) or with another one are refused.

Reading uses the stdlib `tomllib`. Editing uses `tomlkit`, whose document model renders the
untouched parts of the file as they were, plus three things of our own:

* New `[...auth]` tables and removed tables are marked in the document by placeholder lines
  (`\\x00N\\x00`, which no valid TOML text contains) and spliced into the rendered text
  afterwards. That way we, not tomlkit, decide indentation and blank lines: a new table
  copies an existing sibling `configs.*.auth` (or `.tls`) table, else indents like
  containerd's own generator (one unit per table level, unit measured on the file), and takes
  the blank-line habit of the spot it lands in: after the last `registry.configs` table of
  the plugin, else at the end of the deepest existing ancestor (`registry`, the plugin,
  `plugins`, the file). Adding a table and removing it again gives back the original bytes.
* Where tomlkit would re-indent a header it did not edit (a known quirk), the edit is carried
  over onto the file's own lines.
* Every edit is checked by parsing the result with `tomllib`: the data must equal the old
  data with exactly the requested `auth` tables changed. Anything else raises FormatError,
  so a tomlkit surprise can never reach the node.

The common change, a password rotation (same hosts, same fields, new string values, in
`[...auth]` header tables of `key = "string"` lines), skips tomlkit: the value part of those
lines is rewritten in the text (`_rotate_in_place`), and the result goes through the same
`tomllib` check. Any other shape, or a check that fails, takes the tomlkit path.

Inline tables on the path (`registry = { ... }`, `configs = { ... }`, `auth = { ... }`) are
edited by re-rendering that one inline table (it is a single line); dotted keys
(`auth.username = ...`) are edited in place. No message ever holds a value from the file:
parser messages can quote the offending text, so only their line and column are kept.
"""

import re
import tomllib
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from functools import cached_property
from typing import Any, Final

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import ParseError, TOMLKitError
from tomlkit.items import (
    AoT,
    Array,
    Comment,
    InlineTable,
    Item,
    Key,
    KeyType,
    Null,
    SingleKey,
    String,
    StringType,
    Table,
    Whitespace,
)

from node_agent.credentials import DOCKER_HUB, RegistryAuth
from node_agent.targets import REDACTED, Entry, FormatError, Skip, looks_secret

#: The CRI plugin holding the registry configuration, by config version
#: (docs/node-facts.md#containerd-auth-location).
PLUGIN_BY_VERSION: Final = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.images"}
#: containerd looks credentials up under the host it contacts; for Docker Hub that is not
#: `docker.io` (docs/node-facts.md#containerd-auth-keys).
DOCKER_HUB_HOST: Final = "registry-1.docker.io"
CREDENTIAL_FIELDS: Final = frozenset(
    {"username", "password", "auth", "identitytoken", "registrytoken"}
)

# Path indexes of the keys in plugins.PLUGIN.registry.configs.HOST.auth.
_CONFIGS, _HOST, _AUTH = 3, 4, 5
_SENTINEL: Final = re.compile("\x00([0-9]+)\x00\n")
_PARSER_POSITION: Final = re.compile(r"\(at (line \d+, column \d+|end of document)\)\s*$")
_BLANK_LINE_BEFORE_HEADER: Final = re.compile(r"\n[ \t]*\r?\n[ \t]*\[")
_NEW_FILE_FIELD_INDENT: Final = "  "
# What tomlkit raises on files it cannot load: its own errors, and its bugs (e.g. an
# AttributeError when parent tables come after their children) and deep nesting.
_TOMLKIT_FAILURES: Final = (
    TOMLKitError,
    AttributeError,
    KeyError,
    TypeError,
    ValueError,
    IndexError,
    RecursionError,
)


class ContainerdFormat:
    """`NodeFileFormat` for containerd's config.toml (config versions 2 and 3)."""

    name = "containerd"

    def __init__(self, *, new_file_version: int = 2) -> None:
        """`new_file_version`: the config version written when the file does not exist yet."""
        if new_file_version not in PLUGIN_BY_VERSION:
            raise ValueError("new_file_version must be 2 or 3")
        self.new_file_version = new_file_version
        self._parsed = _ParsedTexts()

    def desired_entry(self, registry: str, auth: RegistryAuth) -> tuple[str, Entry] | Skip:
        if "*" in registry:
            return Skip("containerd looks credentials up by exact host; it has no wildcards")
        if registry.startswith("["):
            # containerd 1.6/1.7's TOML parser refuses `]` inside a quoted table-header key
            # (`[...configs."[::1]:5000".auth]`): the whole file would fail at its next start.
            return Skip("containerd 1.6/1.7 cannot load an IPv6 registry key from config.toml")
        # containerd prefers username/password, then identitytoken, then `auth`
        # (docs/node-facts.md#containerd-auth-fields);
        # we write only the field it will use.
        host = DOCKER_HUB_HOST if registry == DOCKER_HUB else registry
        if auth.username:
            return host, {"username": auth.username, "password": auth.password}
        if auth.identitytoken:
            return host, {"identitytoken": auth.identitytoken}
        if auth.password:
            return host, {"auth": auth.basic_auth_token()}
        return Skip("credential has no username, password or identitytoken")

    def entries(self, text: str | None) -> dict[str, dict[str, Any]]:
        if text is None:
            return {}
        data = self._read(text)
        configs = _configs_in(data, _plugin_of(data))
        return {
            host: _detached(config["auth"]) for host, config in configs.items() if "auth" in config
        }

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        if text is not None and not updates:
            return text
        new_file = text is None
        text = f"version = {self.new_file_version}\n" if text is None else text
        data = self._read(text)
        plugin = _plugin_of(data)
        changes = _real_changes(_configs_in(data, plugin), updates)
        if not changes:
            return text
        rotated = None if new_file else _rotation(text, data, plugin, changes)
        result, after = rotated or _edited(text, data, plugin, changes, new_file=new_file)
        # The next pass starts by reading the file we are about to write.
        self._parsed.put(result, after)
        return result

    def redact(self, text: str) -> str:
        document = _parse_document(text)
        untouched = document.as_string()
        credential_tables = {id(table) for table in _credential_tables(document)}
        for table, is_headers in _tables_with_headers_flag(document):
            for key, item in list(_body(table)):
                if key is None or not _is_value(item):
                    continue
                name = key.key
                credential = id(table) in credential_tables and name in CREDENTIAL_FIELDS
                if credential or is_headers or looks_secret(name):
                    table[name] = _redacted_like(item)
        return _on_original_lines(text, untouched, document.as_string())

    def _read(self, text: str) -> dict[str, Any]:
        """`_load(text)`, remembered: a pass reads the same text two or three times."""
        data = self._parsed.get(text)
        if data is None:
            data = _load(text)
            self._parsed.put(text, data)
        return data


class _ParsedTexts:
    """The last two texts read or rendered, with their tomllib data.

    One reconcile pass calls `entries(text)` then `render(text, ...)`, and the next pass
    reads the text that render produced and verified. The data is shared, so nothing may
    mutate it (`entries` hands out copies; `_verify` prunes a copy). An instance serves one
    target's worker thread; should threads share it anyway, the entries are immutable pairs
    swapped in as a new tuple, so a race can lose an entry but never return a wrong one.
    """

    size: Final = 2

    def __init__(self) -> None:
        self._items: tuple[tuple[str, dict[str, Any]], ...] = ()

    def get(self, text: str) -> dict[str, Any] | None:
        # `==` on str checks identity, then length, then compares memory: microseconds.
        return next((data for known, data in self._items if known == text), None)

    def put(self, text: str, data: dict[str, Any]) -> None:
        others = tuple(item for item in self._items if item[0] != text)
        self._items = ((text, data), *others[: self.size - 1])


def _detached(auth: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a parsed auth table that callers may mutate without touching the cache
    (only lists and tables are mutable in tomllib's output)."""
    return {
        name: deepcopy(value) if isinstance(value, list | dict) else value
        for name, value in auth.items()
    }


def _edited(
    text: str,
    data: Mapping[str, Any],
    plugin: str,
    changes: Mapping[str, Entry | None],
    *,
    new_file: bool,
) -> tuple[str, dict[str, Any]]:
    """The general edit through tomlkit: the result and its (verified) tomllib data."""
    layout = _Layout.new_file() if new_file else _Layout.of(text)
    document = _parse_document(text)
    untouched = document.as_string()
    editor = _Editor(document, plugin, layout)
    try:
        for host, entry in changes.items():
            editor.apply(host, entry)
        result = _on_original_lines(text, untouched, editor.result())
    except TOMLKitError:
        # tomlkit's messages may quote the value it choked on.
        raise FormatError("tomlkit could not edit the registry tables; refusing") from None
    return result, _verify(data, result, plugin, changes)


# Reading (tomllib)


def _load(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # The parser's message can quote the offending text (a password, say): keep only
        # the position, and do not chain the original.
        raise FormatError(
            f"config is not valid TOML ({_position_of(error)}); refusing to edit"
        ) from None
    except RecursionError:
        raise FormatError("config is nested too deeply to read; refusing to edit") from None


def _position_of(error: tomllib.TOMLDecodeError) -> str:
    match = _PARSER_POSITION.search(str(error))
    return f"at {match.group(1)}" if match else "position unknown"


def _plugin_of(data: Mapping[str, Any]) -> str:
    if "version" not in data:
        raise FormatError("config has no 'version' key (containerd v1 layout); refusing to edit")
    version = data["version"]
    if type(version) is not int or version not in PLUGIN_BY_VERSION:
        raise FormatError("config 'version' is neither 2 nor 3; refusing to edit")
    return PLUGIN_BY_VERSION[version]


def _configs_in(data: Mapping[str, Any], plugin: str) -> dict[str, dict[str, Any]]:
    """`registry.configs` of `plugin`, checked to be tables down to each `auth`."""
    node: Any = data
    for name in ("plugins", plugin, "registry", "configs"):
        node = node.get(name, {})
        if not isinstance(node, dict):
            raise FormatError(f"'{name}' on the registry path is not a table; refusing to edit")
    for config in node.values():
        if not isinstance(config, dict) or not isinstance(config.get("auth", {}), dict):
            raise FormatError("a registry.configs entry is not a table; refusing to edit")
    return node  # type: ignore[no-any-return]


def _real_changes(
    configs: Mapping[str, Mapping[str, Any]], updates: Mapping[str, Entry | None]
) -> dict[str, Entry | None]:
    """The updates that change something; the others must not touch the file at all."""
    return {
        host: entry
        for host, entry in updates.items()
        if (None if entry is None else dict(entry)) != configs.get(host, {}).get("auth")
    }


# Verification (tomllib again)


def _verify(
    before: Mapping[str, Any], text: str, plugin: str, changes: Mapping[str, Entry | None]
) -> dict[str, Any]:
    """The tomllib data of the edited `text`, checked to be `before` with exactly `changes`."""
    try:
        after = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        raise FormatError("the edit would not be valid TOML; refusing to write") from None
    expected = _with_changes(before, plugin, changes)
    if _pruned(after, plugin, changes) != expected:
        raise FormatError("the edit would change more than the registry auth tables; refusing")
    return after


def _pruned(data: Mapping[str, Any], plugin: str, hosts: Iterable[str]) -> dict[str, Any]:
    """`data` without the empty tables on the registry path. Copied along that path, so
    `data` itself stays as parsed (it is remembered for the next pass)."""
    result = dict(data)
    node = result
    for name in ("plugins", plugin, "registry", "configs"):
        child = node.get(name)
        if not isinstance(child, dict):
            break
        copy = dict(child)
        node[name] = copy
        node = copy
    _prune_registry_path(result, plugin, hosts)
    return result


def _with_changes(
    data: Mapping[str, Any], plugin: str, changes: Mapping[str, Entry | None]
) -> dict[str, Any]:
    """`data` with the changes applied, copied only along the registry path."""
    result = dict(data)
    node = result
    for name in ("plugins", plugin, "registry", "configs"):
        node[name] = dict(node.get(name, {}))
        node = node[name]
    for host, entry in changes.items():
        config = dict(node.get(host, {}))
        config.pop("auth", None)
        if entry is not None:
            config["auth"] = dict(entry)
        node[host] = config
    _prune_registry_path(result, plugin, changes)
    return result


def _prune_registry_path(data: dict[str, Any], plugin: str, hosts: Iterable[str]) -> None:
    """Drop tables on the registry path that are empty: whether an emptied `configs` or
    a `registry` we created stays as an empty table is layout, not meaning."""
    names = ("plugins", plugin, "registry", "configs")
    chain = [data]
    for name in names:
        child = chain[-1].get(name)
        if not isinstance(child, dict):
            break
        chain.append(child)
    if len(chain) == len(names) + 1:
        configs = chain[-1]
        for host in hosts:
            if configs.get(host) == {}:
                del configs[host]
    for parent, name in reversed(list(zip(chain[:-1], names, strict=False))):
        if parent[name] == {}:
            del parent[name]


# The fast path: a rotation as a line edit

# A key as the fast path reads it: bare, or quoted without escapes (anything else: declined).
_KEY_TEXT: Final = r"""[A-Za-z0-9_-]+|"[^"\\\x00-\x1f\x7f]*"|'[^'\x00-\x08\x0a-\x1f\x7f]*'"""
_KEY: Final = re.compile(_KEY_TEXT)
#: A `[table]` header (not `[[array]]`) spelled with such keys, with an optional comment.
_TABLE_HEADER: Final = re.compile(
    rf"[ \t]*\[(?!\[)[ \t]*(?P<keys>(?:{_KEY_TEXT})(?:[ \t]*\.[ \t]*(?:{_KEY_TEXT}))*)"
    r"[ \t]*\][ \t]*(?:#.*)?\r?"
)
#: Where a table starts: any line opening with `[`. Headers the regex above cannot read
#: still end the table before them.
_TABLE_START: Final = re.compile(r"[ \t]*\[")
#: `key = "basic string"` or `key = 'literal string'`, an optional comment, the line's end.
_STRING_FIELD: Final = re.compile(
    rf"[ \t]*(?P<key>{_KEY_TEXT})[ \t]*=[ \t]*"
    r"""(?P<value>"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\.)*"|'[^'\x00-\x08\x0a-\x1f\x7f]*')"""
    r"[ \t]*(?:#.*)?\r?"
)
# Inside a multi-line string, a line only looks like a header or a field: files with
# multi-line strings are left to tomlkit.
_MULTI_LINE_STRING: Final = re.compile(r"""\"\"\"|'''""")
# Lone surrogates cannot be written as UTF-8; the general path deals with them as before.
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_BASIC_STRING_ESCAPES: Final = {
    **{code: f"\\u{code:04x}" for code in (*range(0x20), 0x7F)},
    **{ord(c): f"\\{short}" for c, short in zip('\b\t\n\f\r"\\', 'btnfr"\\', strict=True)},
}


def _basic_string(value: str) -> str:
    """`value` as a TOML basic string, escaped as tomlkit escapes it (short forms where
    TOML has them, `\\uXXXX` for the other control characters)."""
    return '"' + value.translate(_BASIC_STRING_ESCAPES) + '"'


def _rotate_in_place(
    text: str, changes: Mapping[str, Entry | None], *, data: Mapping[str, Any] | None = None
) -> str | None:
    """`text` with `changes` made by rewriting values on their lines, verified like every
    edit; None when the changes or the layout are not a simple rotation, or the check
    fails. `data`: `text` already parsed by tomllib."""
    try:
        data = _load(text) if data is None else data
        plugin = _plugin_of(data)
    except FormatError:
        return None
    rotated = _rotation(text, data, plugin, changes)
    return None if rotated is None else rotated[0]


def _rotation(
    text: str, data: Mapping[str, Any], plugin: str, changes: Mapping[str, Entry | None]
) -> tuple[str, dict[str, Any]] | None:
    """`_rotate_in_place` on parsed text: the result and its verified tomllib data."""
    values = _rotated_values(data, plugin, changes)
    if values is None or _MULTI_LINE_STRING.search(text):
        return None
    lines = text.split("\n")  # not splitlines(): that also splits at \x0c, \u2028, ...
    tables = _HeaderIndex.of(lines)
    for host, fields in values.items():
        body = tables.body_of(("plugins", plugin, "registry", "configs", host, "auth"))
        if body is None or not _rewrite_values(lines, body, fields):
            return None
    result = "\n".join(lines)
    try:
        return result, _verify(data, result, plugin, changes)
    except FormatError:
        return None


def _rotated_values(
    data: Mapping[str, Any], plugin: str, changes: Mapping[str, Entry | None]
) -> dict[str, dict[str, str]] | None:
    """The new string values by host and field, when `changes` only replaces string values
    of existing fields (same hosts, same fields); else None."""
    try:
        configs = _configs_in(data, plugin)
    except FormatError:
        return None
    values: dict[str, dict[str, str]] = {}
    for host, entry in changes.items():
        old = configs.get(host, {}).get("auth")
        if entry is None or old is None or set(entry) != set(old):
            return None
        changed = {name: value for name, value in entry.items() if value != old[name]}
        if not all(
            isinstance(value, str) and isinstance(old[name], str) and not _SURROGATE.search(value)
            for name, value in changed.items()
        ):
            return None
        if changed:
            values[host] = changed
    return values


@dataclass(frozen=True)
class _HeaderIndex:
    """Where the tables of a text start, and the headers the fast path can read."""

    #: Indexes of the lines that open a table, ascending.
    starts: list[int]
    #: Each readable header's key path → the indexes of its lines.
    headers: dict[tuple[str, ...], list[int]]
    line_count: int

    @classmethod
    def of(cls, lines: Sequence[str]) -> "_HeaderIndex":
        starts: list[int] = []
        headers: dict[tuple[str, ...], list[int]] = {}
        for index, line in enumerate(lines):
            if not _TABLE_START.match(line):
                continue
            starts.append(index)
            if header := _TABLE_HEADER.fullmatch(line):
                path = tuple(_key_name(key) for key in _KEY.findall(header["keys"]))
                headers.setdefault(path, []).append(index)
        return cls(starts, headers, len(lines))

    def body_of(self, path: tuple[str, ...]) -> range | None:
        """The lines below the header of table `path` up to the next table, if exactly one
        header names it."""
        found = self.headers.get(path, [])
        if len(found) != 1:
            return None
        following = bisect_right(self.starts, found[0])
        end = self.starts[following] if following < len(self.starts) else self.line_count
        return range(found[0] + 1, end)


def _key_name(key: str) -> str:
    return key[1:-1] if key[0] in "\"'" else key


def _rewrite_values(lines: list[str], body: range, values: Mapping[str, str]) -> bool:
    """Put `values` on their `key = "string"` lines in `body`; False (and nothing changed)
    unless each field is on exactly one such line."""
    found: dict[str, tuple[int, re.Match[str]]] = {}
    for index in body:
        field_line = _STRING_FIELD.fullmatch(lines[index])
        if field_line is None or (name := _key_name(field_line["key"])) not in values:
            continue
        if name in found:
            return False
        found[name] = (index, field_line)
    if found.keys() != values.keys():
        return False
    for name, (index, field_line) in found.items():
        value = _string_text(values[name], like=field_line["value"])
        line = lines[index]
        lines[index] = line[: field_line.start("value")] + value + line[field_line.end("value") :]
    return True


def _string_text(value: str, *, like: str) -> str:
    """`value` as a TOML string, single-quoted like the old value where it can be (as
    `_string_like` decides on the general path)."""
    return f"'{value}'" if like.startswith("'") and _literal_safe(value) else _basic_string(value)


# The tomlkit document


def _parse_document(text: str) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(text)
    except ParseError as error:
        # e.g. tomlkit issue #571: valid TOML (tomllib reads it) that tomlkit cannot load.
        raise FormatError(
            f"tomlkit cannot load this config (line {error.line}, column {error.col}); "
            "refusing to edit"
        ) from None
    except _TOMLKIT_FAILURES:
        raise FormatError("tomlkit cannot load this config; refusing to edit") from None


def _on_original_lines(original: str, untouched: str, edited: str) -> str:
    """The edit (`untouched` → `edited`, both as tomlkit renders them) made on `original`.

    tomlkit renders most files exactly as read, and then `edited` is the answer. Some it
    re-indents: a table header under an implicit parent met a second time (`[a.b]`,
    `  [a.c.d]`, `  [a.c.e]`) gets its parent's indent added. Then the changed lines are
    carried over onto the file's own lines, so nothing we did not edit moves. Any other
    difference is refused.
    """
    if untouched == original:
        return edited
    old_lines = original.splitlines(keepends=True)
    untouched_lines = untouched.splitlines(keepends=True)
    if len(old_lines) != len(untouched_lines) or any(
        old.strip() != new.strip() for old, new in zip(old_lines, untouched_lines, strict=True)
    ):
        raise FormatError("tomlkit does not reproduce this config faithfully; refusing to edit")
    edited_lines = edited.splitlines(keepends=True)
    matcher = SequenceMatcher(None, untouched_lines, edited_lines, autojunk=False)
    return "".join(
        "".join(old_lines[i1:i2] if tag == "equal" else edited_lines[j1:j2])
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
    )


AnyTable = Container | Table | InlineTable


@dataclass(frozen=True, eq=False)
class _Node:
    """One occurrence of a table in the document. A table can occur several times: dotted
    keys (`auth.username = ...`) and out-of-order headers each make one occurrence."""

    item: AnyTable
    key: Key | None
    parent: "_Node | None"
    #: Index of `key` in the path plugins.PLUGIN.registry.configs.HOST.auth (root: -1).
    depth: int

    @property
    def is_dotted(self) -> bool:
        return self.key is not None and self.key.is_dotted()

    @property
    def is_inline(self) -> bool:
        return isinstance(self.item, InlineTable)

    @property
    def is_block(self) -> bool:
        """The document or a `[header]` table (possibly implicit): new headers may follow."""
        return isinstance(self.item, Container) or (
            isinstance(self.item, Table) and not self.is_dotted
        )

    @property
    def is_header(self) -> bool:
        return (
            isinstance(self.item, Table) and not self.item.is_super_table() and not self.is_dotted
        )

    @property
    def header_indent(self) -> str:
        """The whitespace before this table's `[header]` on its line."""
        return _line_indent(self.item) if isinstance(self.item, Table) else ""

    def chain(self) -> list["_Node"]:
        """This node and its ancestors, outermost first, without the document."""
        nodes: list[_Node] = []
        node: _Node | None = self
        while node is not None and node.key is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


def _body(table: AnyTable) -> list[tuple[Key | None, Item]]:
    return table.body if isinstance(table, Container) else table.value.body


def _container(table: AnyTable) -> Container:
    return table if isinstance(table, Container) else table.value


def _children(parents: Sequence[_Node], name: str) -> list[_Node]:
    """The occurrences of table `name` in `parents` (values of that name are skipped)."""
    return [
        _Node(item, key, parent, parent.depth + 1)
        for parent in parents
        for key, item in _body(parent.item)
        if key is not None and key.key == name and isinstance(item, (Table, InlineTable))
    ]


@dataclass(frozen=True)
class _Found:
    """What exists of the path plugins.PLUGIN.registry.configs.HOST.auth in a document."""

    root: _Node
    #: levels[i]: the occurrences of path[i], in document order, for as deep as they exist.
    levels: list[list[_Node]]

    def at(self, index: int) -> list[_Node]:
        return self.levels[index] if index < len(self.levels) else []

    @property
    def deepest(self) -> _Node:
        return self.levels[-1][-1] if self.levels else self.root

    @property
    def outermost_inline(self) -> _Node | None:
        return next((node for level in self.levels for node in level if node.is_inline), None)


def _resolve(document: tomlkit.TOMLDocument, path: Sequence[str]) -> _Found:
    root = _Node(document, None, None, -1)
    levels: list[list[_Node]] = []
    for name in path:
        parents = levels[-1] if levels else [root]
        if any(
            key is not None and key.key == name and not isinstance(item, (Table, InlineTable))
            for parent in parents
            for key, item in _body(parent.item)
        ):
            raise FormatError(f"'{name}' on the registry path is not a table; refusing")
        found = _children(parents, name)
        if not found:
            break
        levels.append(found)
    return _Found(root, levels)


def _is_value(item: Item) -> bool:
    return not isinstance(item, (Table, InlineTable, AoT, Whitespace, Comment, Null))


def _fields(table: AnyTable) -> list[tuple[Key, Item]]:
    return [(key, item) for key, item in _body(table) if key is not None]


def _first_value(table: AnyTable) -> Item | None:
    """The first key/value item of `table`, looking through dotted keys (`a.b = 1` stores
    its line's indent on the value)."""
    for key, item in _fields(table):
        if isinstance(item, Table) and key.is_dotted():
            if (found := _first_value(item)) is not None:
                return found
        elif not isinstance(item, Table):
            return item
    return None


def _line_indent(item: Item) -> str:
    """The whitespace before an item on its own line."""
    return item.trivia.indent.rsplit("\n", 1)[-1]


def _key_text(key: Key) -> str:
    return key.as_string().strip()


# Style of the file, for the tables we add


@dataclass(frozen=True)
class _Layout:
    """How the file lays out tables. Measured once per render, on the original text."""

    newline: str
    #: Whether tables are separated by blank lines (decides the separator at the file's end).
    blank_lines: bool
    #: Indentation for new tables; None: measure it on the document when first needed.
    units: "_Units | None" = None

    @classmethod
    def of(cls, text: str) -> "_Layout":
        newline = "\r\n" if "\r\n" in text else "\n"
        return cls(newline, bool(_BLANK_LINE_BEFORE_HEADER.search(text)))

    @classmethod
    def new_file(cls) -> "_Layout":
        return cls("\n", True, _Units(level="", fields=_NEW_FILE_FIELD_INDENT))


@dataclass(frozen=True)
class _Units:
    """Indentation measured on the document."""

    #: Added per table level to header lines (containerd's generator: two spaces).
    level: str
    #: From a header line to its fields.
    fields: str

    @classmethod
    def measure(cls, document: tomlkit.TOMLDocument) -> "_Units":
        header, field_step = "", ""
        found_header = found_field = False
        for node in _header_tables(_Node(document, None, None, -1)):
            indent = node.header_indent
            if not found_header and node.depth >= 1:
                header, found_header = _per_level(indent, node.depth), True
            if not found_field and (first := _first_value(node.item)) is not None:
                field_step, found_field = _step(indent, _line_indent(first)), True
            if found_header and found_field:
                break
        return cls(header, field_step if found_field else header)


def _header_tables(node: _Node) -> Iterator[_Node]:
    """Header tables under `node`, depth first, in document order."""
    for key, item in _body(node.item):
        if isinstance(item, Table) and key is not None and not key.is_dotted():
            child = _Node(item, key, node, node.depth + 1)
            if child.is_header:
                yield child
            yield from _header_tables(child)


def _per_level(indent: str, depth: int) -> str:
    """The indent of one level, given a header's indent at `depth` (0 = top level)."""
    if not indent or depth == 0 or len(indent) % depth:
        return ""
    return indent[: len(indent) // depth]


def _step(outer: str, inner: str) -> str:
    return inner[len(outer) :] if inner.startswith(outer) else inner


# Edits


@dataclass(frozen=True)
class _NewTable:
    """A table to splice in where its placeholder is."""

    lines: str
    #: Comment lines the placeholder follows that belong to the next table: the new table
    #: goes above them.
    comment_below: str

    def splice(self, done: str, at_end: bool, layout: _Layout) -> tuple[int, str]:
        """(characters to cut from the end of `done`, text to append)."""
        moved = self.comment_below if done.endswith(self.comment_below) else ""
        end = len(done) - len(moved)  # where the table goes
        separator = layout.newline if at_end and layout.blank_lines else ""
        if end and not done.endswith("\n", 0, end):  # the file had no final newline
            return len(moved), layout.newline + separator + self.lines + moved
        if _blank_tail_length(done, end):
            # Take the blank line we land after, and give one back to what follows.
            return len(moved), self.lines + layout.newline + moved
        return len(moved), separator + self.lines + moved


@dataclass(frozen=True)
class _NewFields:
    """Field lines to splice in after an existing field (or header) line."""

    lines: str

    def splice(self, done: str, at_end: bool, layout: _Layout) -> tuple[int, str]:
        """(characters to cut from the end of `done`, text to append)."""
        if done and not done.endswith("\n"):  # after a last line with no newline
            return 0, layout.newline + self.lines
        return 0, self.lines


@dataclass(frozen=True)
class _Removal:
    """A removed table; its trailing comments belonged to what follows and stay."""

    kept_comments: str
    ended_with_blank_line: bool

    def splice(self, done: str, at_end: bool, layout: _Layout) -> tuple[int, str]:
        """(characters to cut from the end of `done`, text to append)."""
        if at_end and not self.kept_comments and not self.ended_with_blank_line:
            # The table was last and its separator was the blank line before it.
            return _blank_tail_length(done, len(done)), ""
        return 0, self.kept_comments


def _blank_tail_length(text: str, end: int) -> int:
    """How many characters of `text[:end]` are blank lines after its last non-blank line.
    Looks at the last lines only: the text can be long and this runs once per change."""
    cut = end
    while cut > 0 and text[cut - 1] == "\n":
        line_start = text.rfind("\n", 0, cut - 1) + 1
        if text[line_start : cut - 1].strip(" \t\r"):
            break
        cut = line_start
    return end - cut


@dataclass
class _Editor:
    """Applies auth changes to one parsed document; `result()` renders it once."""

    document: tomlkit.TOMLDocument
    plugin: str
    layout: _Layout
    _pending: list[_NewTable | _NewFields | _Removal] = field(default_factory=list)
    _comment_below: dict[int, str] = field(default_factory=dict)

    def apply(self, host: str, entry: Entry | None) -> None:
        path = ("plugins", self.plugin, "registry", "configs", host, "auth")
        found = _resolve(self.document, path)
        inline = found.outermost_inline
        if inline is not None:
            self._edit_inline(inline, path, entry, hosts=found.at(_HOST))
        elif found.at(_AUTH):
            if entry is None:
                self._remove_auth(found.at(_HOST), found.at(_AUTH))
            else:
                self._update_fields(found.at(_AUTH), entry)
        elif entry is not None:
            self._add_auth(found, path, entry)

    def result(self) -> str:
        pieces = _SENTINEL.split(self.document.as_string())
        last_text = max(i for i in range(0, len(pieces), 2) if pieces[i] or i == 0)
        done = pieces[0]
        for index in range(1, len(pieces), 2):
            change = self._pending[int(pieces[index])]
            cut, text = change.splice(done, index > last_text, self.layout)
            if cut:
                done = done[:-cut]
            done += text  # appends in place: `done` is the only reference
            done += pieces[index + 1]
        return done

    @cached_property
    def _units(self) -> _Units:
        return self.layout.units or _Units.measure(self.document)

    def _placeholder(self, change: _NewTable | _NewFields | _Removal) -> Whitespace:
        self._pending.append(change)
        return Whitespace(f"\x00{len(self._pending) - 1}\x00\n")

    # Existing auth tables (headers or dotted keys)

    def _update_fields(self, auth: Sequence[_Node], entry: Entry) -> None:
        where = {key.key: (node, key, item) for node in auth for key, item in _fields(node.item)}
        last = auth[-1]
        last_fields = _fields(last.item)
        # New fields are written like the table's last field and land after its last field
        # left standing (where the last removed one was, if none is left).
        like = last_fields[-1][1] if last_fields else None
        removed_slot: int | None = None
        for name, (node, key, item) in where.items():
            if name not in entry:
                if node is last:
                    removed_slot = _remove_field(last, key)
                else:
                    node.item.remove(key.key)
            elif item.unwrap() != entry[name]:
                node.item[key.key] = _value_item(entry[name], like=item)
        new = {name: value for name, value in entry.items() if name not in where}
        if new:
            self._add_fields(last, new, like=like, removed_slot=removed_slot)

    def _add_fields(
        self, auth: _Node, values: Mapping[str, Any], *, like: Item | None, removed_slot: int | None
    ) -> None:
        """New field lines for an existing auth table, spliced in as text: tomlkit's public
        API can only append a field after the comments that end a table."""
        indent = _line_indent(like) if like is not None else auth.header_indent + self._units.fields
        prefix = "".join(
            f"{_key_text(node.key)}." for node in auth.chain() if node.key and node.is_dotted
        )
        newline = self.layout.newline
        lines = "".join(
            f"{indent}{prefix}{_key_text(SingleKey(name))} = "
            f"{_value_item(value, like=like).as_string()}{newline}"
            for name, value in values.items()
        )
        placeholder = self._placeholder(_NewFields(lines))
        standing = _fields(auth.item)
        if standing:
            standing[-1][1].trivia.trail += placeholder.s
        elif removed_slot is not None:
            _container(auth.item).body[removed_slot] = (None, placeholder)
        else:
            assert isinstance(auth.item, Table)  # a dotted table always has a field
            auth.item.trivia.trail += placeholder.s

    def _remove_auth(self, hosts: Sequence[_Node], auth: Sequence[_Node]) -> None:
        other_keys = {key.key for node in hosts for key, _ in _fields(node.item)} - {"auth"}
        if not other_keys and len(hosts) == 1 and hosts[0].is_block:
            self._remove_node(hosts[0])  # nothing else (no tls, no headers) under the host
            return
        cleared: set[int] = set()
        for node in auth:
            if id(node.parent) not in cleared:  # one remove() drops all dotted occurrences
                cleared.add(id(node.parent))
                self._remove_node(node)
        self._remove_host_if_empty(hosts)

    def _remove_host_if_empty(self, hosts: Sequence[_Node]) -> None:
        if len(hosts) == 1 and hosts[0].is_header and not _fields(hosts[0].item):
            self._remove_node(hosts[0])

    def _remove_node(self, node: _Node) -> None:
        assert node.parent is not None and node.key is not None
        parent, container = node.parent.item, _container(node.parent.item)
        if not node.is_block:
            parent.remove(node.key)  # a key/value line: tomlkit drops the whole line
            return
        index = next(i for i, (_, item) in enumerate(container.body) if item is node.item)
        removal = _removal_of(node.item)
        parent.remove(node.key)
        # remove() leaves a Null in the slot; our placeholder takes it.
        container.body[index] = (None, self._placeholder(removal))

    # New auth tables

    def _add_auth(self, found: _Found, path: Sequence[str], entry: Entry) -> None:
        deepest = anchor = found.deepest
        while not anchor.is_block:  # below a dotted key: the new header follows its table
            assert anchor.parent is not None
            anchor = anchor.parent
        header_indent, field_indent, like = self._new_table_style(found.at(_CONFIGS), deepest)
        newline = self.layout.newline
        lines = f"{header_indent}[{_new_header(found, path)}]{newline}" + "".join(
            f"{field_indent}{_key_text(SingleKey(name))} = "
            f"{_value_item(value, like=like).as_string()}{newline}"
            for name, value in entry.items()
        )
        if id(anchor.item) not in self._comment_below:  # before our first placeholder joins it
            self._comment_below[id(anchor.item)] = _comment_below(anchor.item)
        comment = self._comment_below[id(anchor.item)]
        _container(anchor.item).append(None, self._placeholder(_NewTable(lines, comment)))

    def _new_table_style(
        self, configs: Sequence[_Node], deepest: _Node
    ) -> tuple[str, str, Item | None]:
        """Header indent, field indent, and a string to copy the quoting of."""
        sibling = _sibling_table(configs)
        if sibling is not None:
            header = sibling.header_indent
            first = _first_value(sibling.item)
            if first is not None:
                return header, _line_indent(first), first
            return header, header + self._units.fields, None
        ancestor = next((n for n in reversed(deepest.chain()) if n.is_header), None)
        if ancestor is None:
            header = self._units.level * _AUTH
            return header, header + self._units.fields, None
        header = ancestor.header_indent + self._units.level * (_AUTH - ancestor.depth)
        first = _first_value(ancestor.item)
        if first is None:
            return header, header + self._units.fields, None
        return header, header + _step(ancestor.header_indent, _line_indent(first)), first

    # Inline tables

    def _edit_inline(
        self,
        inline: _Node,
        path: Sequence[str],
        entry: Entry | None,
        *,
        hosts: Sequence[_Node],
    ) -> None:
        assert isinstance(inline.item, InlineTable) and inline.parent and inline.key
        text = _inline_with(inline.item, inline.depth, path, entry)
        if text is None:
            inline.parent.item.remove(inline.key)
            if inline.depth == _AUTH:
                self._remove_host_if_empty(hosts)
        else:
            inline.parent.item[inline.key.key] = _parse_value(text)


def _remove_field(auth: _Node, key: Key) -> int:
    """Remove a field of `auth`; its body slot, which remove() leaves holding a Null."""
    body = _container(auth.item).body
    index = next(i for i, (found, _) in enumerate(body) if found is key)
    auth.item.remove(key.key)
    return index


def _sibling_table(configs: Sequence[_Node]) -> _Node | None:
    """The header table a new auth table should look like: the last
    `[...configs."OTHER".auth]` of this plugin, else the last other per-host table
    (`[...configs."OTHER".tls]`), if any."""
    hosts = [node for node in _child_nodes(configs) if isinstance(node.item, Table)]
    tables = [node for node in _child_nodes(hosts) if node.is_header]
    auth_tables = [node for node in tables if node.key is not None and node.key.key == "auth"]
    candidates = auth_tables or tables
    return candidates[-1] if candidates else None


def _new_header(found: _Found, path: Sequence[str]) -> str:
    """The dotted name of the new auth table: existing keys as the file spells them."""
    keys = [_key_text(node.key) for node in found.deepest.chain() if node.key is not None]
    for index in range(len(keys), len(path)):
        if index == _HOST:
            keys.append(_host_key_text(path[index], found.at(_CONFIGS)))
        else:
            keys.append(_key_text(SingleKey(path[index])))  # quoted when needed: the plugin
    return ".".join(keys)


def _host_key_text(host: str, configs: Sequence[_Node]) -> str:
    """Hosts are always quoted; with single quotes when the sibling hosts are."""
    siblings = [key for node in configs for key, _ in _fields(node.item)]
    literal = (
        bool(siblings)
        and isinstance(siblings[-1], SingleKey)
        and siblings[-1].t is KeyType.Literal
        and _literal_safe(host)
    )
    return _key_text(SingleKey(host, t=KeyType.Literal if literal else KeyType.Basic))


def _comment_below(table: AnyTable) -> str:
    """The comment block that ends `table`'s last descendant, if a blank line detaches it
    from the content above: it introduces whatever follows, so new tables go above it."""
    trailing = _trailing_trivia(table)
    first_comment = next((i for i, item in enumerate(trailing) if isinstance(item, Comment)), None)
    if first_comment is None:
        return ""
    above = trailing[:first_comment]
    if not any(isinstance(item, Whitespace) and "\n" in item.s for item in above):
        return ""
    return "".join(item.as_string() for item in trailing[first_comment:])


def _removal_of(table: AnyTable) -> _Removal:
    trailing = _trailing_trivia(table)
    first_comment = next(
        (i for i, item in enumerate(trailing) if isinstance(item, Comment)), len(trailing)
    )
    return _Removal(
        kept_comments="".join(item.as_string() for item in trailing[first_comment:]),
        ended_with_blank_line=any(
            isinstance(item, Whitespace) and "\n" in item.s for item in trailing[:first_comment]
        ),
    )


def _trailing_trivia(table: AnyTable) -> list[Item]:
    """Blank lines and comments at the very end of `table`'s text (its last descendant)."""
    body = _body(table)
    while True:
        last = next(((k, v) for k, v in reversed(body) if not isinstance(v, Null)), None)
        if last is None or not isinstance(last[1], Table) or last[0] is None:
            break
        if last[0].is_dotted():
            break
        body = last[1].value.body
    trailing: list[Item] = []
    for key, item in reversed(body):
        if isinstance(item, Null):
            continue
        if key is not None or not isinstance(item, (Whitespace, Comment)):
            break
        trailing.append(item)
    return trailing[::-1]


def _inline_with(
    table: InlineTable, depth: int, path: Sequence[str], entry: Entry | None
) -> str | None:
    """The text of inline `table` (at `depth` on `path`) with the auth change made, or None
    when the table should go: the auth table itself, or a table our removal left empty."""
    if depth == _AUTH:
        if entry is None:
            return None
        return _inline_text(_auth_pairs(table, entry), spaced=_is_spaced(table))
    pairs: list[tuple[str, str]] = []
    child_name = path[depth + 1]
    found = False
    for key, item in _inline_fields(table):
        if key.key != child_name:
            pairs.append((_key_text(key), item.as_string().strip()))
            continue
        found = True
        if not isinstance(item, InlineTable):
            raise FormatError(f"'{child_name}' on the registry path is not a table; refusing")
        text = _inline_with(item, depth + 1, path, entry)
        if text is not None:
            pairs.append((_key_text(key), text))
    if not found and entry is not None:
        chain = _new_inline_chain(path, depth + 1, entry, spaced=_is_spaced(table))
        pairs.append((_new_inline_key(path, depth + 1), chain))
    return _inline_text(pairs, spaced=_is_spaced(table)) if pairs else None


def _inline_fields(table: InlineTable) -> list[tuple[Key, Item]]:
    fields = _fields(table)
    if any(key.is_dotted() or isinstance(item, Table) for key, item in fields):
        raise FormatError("dotted keys inside an inline registry table; refusing to edit")
    return fields


def _auth_pairs(table: InlineTable | None, entry: Entry) -> list[tuple[str, str]]:
    """Fields in their old order (unchanged ones keep their text), new ones at the end."""
    old = {key.key: (key, item) for key, item in _inline_fields(table)} if table else {}
    pairs = []
    for name, (key, item) in old.items():
        if name in entry:
            same = item.unwrap() == entry[name]
            value = (
                item.as_string().strip()
                if same
                else _value_item(entry[name], like=item).as_string()
            )
            pairs.append((_key_text(key), value))
    for name, value in entry.items():
        if name not in old:
            pairs.append((_key_text(SingleKey(name)), _value_item(value, like=None).as_string()))
    return pairs


def _new_inline_key(path: Sequence[str], index: int) -> str:
    name = path[index]
    return _key_text(SingleKey(name, t=KeyType.Basic) if index == _HOST else SingleKey(name))


def _new_inline_chain(path: Sequence[str], index: int, entry: Entry, *, spaced: bool) -> str:
    """`{ next = { ... = { auth fields } } }` for the path below `path[index]`."""
    if index == _AUTH:
        return _inline_text(_auth_pairs(None, entry), spaced=spaced)
    key = _new_inline_key(path, index + 1)
    chain = _new_inline_chain(path, index + 1, entry, spaced=spaced)
    return _inline_text([(key, chain)], spaced=spaced)


def _inline_text(pairs: Sequence[tuple[str, str]], *, spaced: bool) -> str:
    if not pairs:
        return "{}"
    inner = ", ".join(f"{key} = {value}" for key, value in pairs)
    return f"{{ {inner} }}" if spaced else f"{{{inner}}}"


def _is_spaced(table: InlineTable) -> bool:
    """Whether the file writes `{ a = 1 }` rather than `{a = 1}`."""
    return table.as_string().startswith("{ ")


# Values


def _value_item(value: Any, *, like: Item | None) -> Item:
    """A tomlkit item for a field value; strings copy the quoting of `like` when they can."""
    if isinstance(value, str):
        return _string_like(value, like)
    if isinstance(value, Mapping | list | tuple):
        return _parse_value(_value_text(value))  # inline, whatever tomlkit would choose
    scalar: Item = tomlkit.item(value)  # raises (a TOMLKitError) for what TOML cannot hold
    return scalar


def _value_text(value: Any) -> str:
    if isinstance(value, Mapping):
        pairs = [(_key_text(SingleKey(str(k))), _value_text(v)) for k, v in value.items()]
        return _inline_text(pairs, spaced=True)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return _value_item(value, like=None).as_string()


def _string_like(value: str, like: Item | None) -> String:
    literal = isinstance(like, String) and like.type is StringType.SLL and _literal_safe(value)
    return tomlkit.string(value, literal=literal)


def _literal_safe(value: str) -> bool:
    return "'" not in value and all(c == "\t" or (c >= " " and c != "\x7f") for c in value)


def _parse_value(text: str) -> Item:
    item = tomlkit.parse(f"v = {text}\n").item("v")
    assert isinstance(item, Item)
    return item


# Redaction


def _credential_tables(document: tomlkit.TOMLDocument) -> Iterator[AnyTable]:
    """Every table in the `registry` subtree of every plugin. That covers
    `registry.configs.*.auth`, the legacy `registry.auths.*` and the v1 `plugins.cri` layout,
    in whatever TOML form they are written (dotted keys, inline tables, arrays of tables)."""
    pending = [
        registry
        for plugins in _child_tables(document, "plugins")
        for plugin in _child_tables(plugins)
        for registry in _child_tables(plugin, "registry")
    ]
    while pending:
        table = pending.pop()
        yield table
        pending.extend(_child_tables(table))


def _tables_with_headers_flag(document: tomlkit.TOMLDocument) -> Iterator[tuple[AnyTable, bool]]:
    """Every table in the document, and whether it is (inside) a `headers` table: the HTTP
    headers containerd sends to a registry, `Authorization` among them."""
    pending: list[tuple[AnyTable, bool]] = [(document, False)]
    while pending:
        table, is_headers = pending.pop()
        yield table, is_headers
        for key, item in _body(table):
            if key is None:
                continue
            inside = is_headers or key.key == "headers"
            pending.extend((child, inside) for child in _child_tables_of_item(item))


def _redacted_like(item: Item) -> Item:
    """"***" in the shape of `item`: a string keeps its quoting, an array of strings becomes
    `["***"]`, anything else a string."""
    if isinstance(item, Array):
        return _parse_value(f'["{REDACTED}"]')
    return _string_like(REDACTED, item)


def _child_tables_of_item(item: Item) -> list[AnyTable]:
    if isinstance(item, (Table, InlineTable)):
        return [item]
    if isinstance(item, AoT):
        return list(item.body)
    if isinstance(item, Array):
        return [element for element in item if isinstance(element, InlineTable)]
    return []


def _child_tables(table: AnyTable, name: str | None = None) -> list[AnyTable]:
    """The tables directly in `table` (named `name`, if given), array elements included."""
    return [
        child
        for key, item in _body(table)
        if key is not None and (name is None or key.key == name)
        for child in _child_tables_of_item(item)
    ]


def _child_nodes(parents: Sequence[_Node]) -> list[_Node]:
    """Every table directly in `parents`."""
    return [
        _Node(item, key, parent, parent.depth + 1)
        for parent in parents
        if isinstance(parent.item, (Table, InlineTable))
        for key, item in _body(parent.item)
        if key is not None and isinstance(item, (Table, InlineTable))
    ]
