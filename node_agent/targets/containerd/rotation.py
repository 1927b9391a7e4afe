"""The common change, a password rotation, as a line edit: the value part of `key =
"string"` lines in `[...auth]` header tables is rewritten in the text, and the result is
verified like every edit. Anything else is left to the tomlkit editor. Pure."""

import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from node_agent.targets import Entry, FormatError
from node_agent.targets.containerd.reading import (
    _configs_in,
    _verify,
)
from node_agent.targets.containerd.values import (
    _literal_safe,
)

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


def _rotation(
    text: str, data: Mapping[str, Any], plugin: str, changes: Mapping[str, Entry | None]
) -> tuple[str, dict[str, Any]] | None:
    """`text` (parsed: `data`) with `changes` made by rewriting values on their lines,
    verified like every edit, and its tomllib data; None when the changes or the layout are
    not a simple rotation, or the check fails."""
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
