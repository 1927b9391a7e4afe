"""Hypothesis strategies for containerd config.toml files in unusual but valid layouts.

A document is drawn as data (nested dicts and lists, what `tomllib` returns) and then written
as TOML text with a layout drawn per table: `[header]` tables (sometimes a child's header
before its parent's), inline tables, dotted keys, arrays of tables, comments on their own
lines and after values and headers, blank lines, random indentation, CRLF line endings,
literal and basic strings with escapes. `render` is checked against `tomllib` by the strategy
itself, so every drawn text parses to exactly its data.
"""

from __future__ import annotations

import datetime
import math
import tomllib
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

CRI_BY_VERSION = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.images"}
CREDENTIAL_FIELDS = ("username", "password", "auth", "identitytoken", "registrytoken")

Table = dict[str, Any]

# --- data --------------------------------------------------------------------------------------

bare_keys = st.text("abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=8)
any_keys = st.one_of(
    bare_keys,
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=10),
    st.sampled_from(["plugins", "registry", "configs", "auth", "tls", "mirrors", "a.b", "[x]"]),
)
texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=24)
scalars = st.one_of(
    texts,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False),
    st.datetimes(min_value=datetime.datetime(1, 1, 1)),
    st.dates(),
    st.times(),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4))


def tables(depth: int = 3) -> st.SearchStrategy[Table]:
    """Random tables: scalars, arrays, subtables and arrays of tables."""
    if depth == 0:
        return st.dictionaries(any_keys, values, max_size=3)
    child = tables(depth - 1)
    return st.dictionaries(
        any_keys,
        st.one_of(values, child, st.lists(child, min_size=1, max_size=2)),
        max_size=4,
    )


hosts = st.one_of(
    st.sampled_from(["reg.example:5000", "other.example", "127.0.0.1:5000", "[::1]:443"]),
    st.from_regex(r"[a-z0-9]{1,8}\.example(:[0-9]{1,4})?", fullmatch=True),
)
credential_values = st.one_of(texts, st.just("Canary-Pa55-q7Zr2xW9"))
auth_tables = st.dictionaries(
    st.sampled_from(CREDENTIAL_FIELDS), credential_values, min_size=0, max_size=3
)


@st.composite
def containerd_data(draw: st.DrawFn) -> Table:
    """A config: a version (mostly 2 or 3), registry tables under the CRI plugin of that
    version (or the other one), and random content around and inside them."""
    data = draw(tables(2))
    version = draw(st.sampled_from([2, 2, 2, 3, 3, None, "2", 1]))
    if version is None:
        data.pop("version", None)
    else:
        data["version"] = version
    if draw(st.booleans()):
        plugin = CRI_BY_VERSION.get(version if isinstance(version, int) else 2, "x")
        if draw(st.integers(0, 4)) == 0:
            plugin = draw(st.sampled_from(list(CRI_BY_VERSION.values())))
        registry = draw(tables(1))
        configs: Table = {}
        for host in draw(st.lists(hosts, max_size=3, unique=True)):
            config: Table = draw(st.fixed_dictionaries({}, optional={"tls": tables(0)}))
            if draw(st.booleans()):
                config["auth"] = draw(auth_tables)
            configs[host] = config
        if draw(st.integers(0, 5)):
            registry["configs"] = configs
        elif draw(st.booleans()):
            registry["configs"] = draw(values)  # not a table: the agent must refuse
        plugins = data.setdefault("plugins", {})
        if not isinstance(plugins, dict):
            data["plugins"] = plugins = {}
        plugins[plugin] = {**draw(tables(1)), "registry": registry}
    return data


# --- text ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """The layout choices of one document, drawn once."""

    newline: str
    indent_unit: str
    comments: bool
    literal_strings: bool


def key_text(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return basic_string(key)


def basic_string(text: str) -> str:
    escapes = {
        '"': '\\"',
        "\\": "\\\\",
        "\n": "\\n",
        "\t": "\\t",
        "\r": "\\r",
        "\b": "\\b",
        "\f": "\\f",
    }
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def value_text(value: Any, style: Style) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        literal_ok = "'" not in value and all(c >= " " and c != "\x7f" for c in value)
        return f"'{value}'" if style.literal_strings and literal_ok else basic_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(value_text(item, style) for item in value) + "]"
    if isinstance(value, dict):
        return inline_text(value, style)
    raise TypeError(type(value))


def inline_text(table: Table, style: Style) -> str:
    if not table:
        return "{}"
    return (
        "{ " + ", ".join(f"{key_text(k)} = {value_text(v, style)}" for k, v in table.items()) + " }"
    )


def is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


@dataclass
class Writer:
    """Writes one document; `draw` supplies every layout choice."""

    draw: st.DrawFn
    style: Style

    def document(self, data: Table) -> str:
        lines = self.body([], data, depth=0)
        text = "".join(line + self.style.newline for line in lines)
        return text

    def comment(self, lines: list[str], indent: str) -> None:
        if self.style.comments and self.draw(st.integers(0, 3)) == 0:
            lines.append(
                f"{indent}# {self.draw(st.sampled_from(['note', '[fake.header]', 'x = 1', '']))}"
            )
        if self.draw(st.integers(0, 4)) == 0:
            lines.append("")

    def trailing(self) -> str:
        if self.style.comments and self.draw(st.integers(0, 3)) == 0:
            return " # trailing"
        return ""

    def body(
        self, path: list[str], table: Table, depth: int, *, headers_only: bool = False
    ) -> list[str]:
        """Lines for `table` at `path` whose header (if any) is already written: key/values
        (scalars, inline and dotted subtables) first, then header subtables. `headers_only`:
        there is no header line for `table` itself, so every child needs its own."""
        indent = self.style.indent_unit * depth
        lines: list[str] = []
        later: list[tuple[str, Any, str]] = []
        for key, value in table.items():
            if headers_only:
                later.append((key, value, "header" if isinstance(value, dict) else "array"))
            elif isinstance(value, dict):
                layout = self.draw(st.sampled_from(["header", "header", "inline", "dotted"]))
                if layout == "inline":
                    self.comment(lines, indent)
                    lines.append(f"{indent}{key_text(key)} = {inline_text(value, self.style)}")
                elif layout == "dotted" and value and not _has_table_arrays(value):
                    self.comment(lines, indent)
                    lines.extend(
                        f"{indent}{dotted} = {text}{self.trailing()}"
                        for dotted, text in self.dotted([key_text(key)], value)
                    )
                else:
                    later.append((key, value, "header"))
            elif is_table_array(value):
                layout = self.draw(st.sampled_from(["array", "array", "inline"]))
                if layout == "inline":
                    lines.append(f"{indent}{key_text(key)} = {value_text(value, self.style)}")
                else:
                    later.append((key, value, "array"))
            else:
                self.comment(lines, indent)
                lines.append(
                    f"{indent}{key_text(key)} = {value_text(value, self.style)}{self.trailing()}"
                )
        for key, value, layout in later:
            child = [*path, key_text(key)]
            if layout == "array":
                for element in value:
                    self.comment(lines, indent)
                    lines.append(f"{indent}[[{'.'.join(child)}]]{self.trailing()}")
                    lines.extend(self.inline_only(element, indent + self.style.indent_unit))
            else:
                lines.extend(self.header(child, value, depth))
        return lines

    def header(self, path: list[str], table: Table, depth: int) -> list[str]:
        indent = self.style.indent_unit * depth
        scalars_only = {k: v for k, v in table.items() if not _needs_own_header(v)}
        lines: list[str] = []
        self.comment(lines, indent)
        if table and not scalars_only and self.draw(st.booleans()):
            # An implicit table: only its children get headers.
            return lines + self.body(path, table, depth + 1, headers_only=True)
        if self.draw(st.integers(0, 5)) == 0 and len(scalars_only) < len(table):
            # Children's headers before the parent's own (tomlkit issue #571 territory).
            children = {k: v for k, v in table.items() if _needs_own_header(v)}
            lines.extend(self.body(path, children, depth + 1, headers_only=True))
            lines.append(f"{indent}[{'.'.join(path)}]{self.trailing()}")
            lines.extend(self.inline_only(scalars_only, indent + self.style.indent_unit))
            return lines
        lines.append(f"{indent}[{'.'.join(path)}]{self.trailing()}")
        return lines + self.body(path, table, depth + 1)

    def dotted(self, prefix: list[str], table: Table) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        for key, value in table.items():
            if isinstance(value, dict) and value:
                pairs.extend(self.dotted([*prefix, key_text(key)], value))
            else:
                pairs.append((".".join([*prefix, key_text(key)]), value_text(value, self.style)))
        return pairs

    def inline_only(self, table: Table, indent: str) -> list[str]:
        return [f"{indent}{key_text(k)} = {value_text(v, self.style)}" for k, v in table.items()]


def _needs_own_header(value: Any) -> bool:
    return isinstance(value, dict) or is_table_array(value)


def _has_table_arrays(table: Table) -> bool:
    return any(
        is_table_array(v) or (isinstance(v, dict) and _has_table_arrays(v)) for v in table.values()
    )


@st.composite
def toml_documents(draw: st.DrawFn, data: st.SearchStrategy[Table]) -> tuple[Table, str]:
    """(data, text): `text` is TOML in a random layout that `tomllib` reads as `data`."""
    document = draw(data)
    style = Style(
        newline=draw(st.sampled_from(["\n", "\n", "\r\n"])),
        indent_unit=draw(st.sampled_from(["", "  ", "    ", "\t"])),
        comments=draw(st.booleans()),
        literal_strings=draw(st.booleans()),
    )
    text = Writer(draw, style).document(document)
    assert tomllib.loads(text) == document, text  # the generator itself is right
    return document, text
