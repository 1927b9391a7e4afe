"""How the file lays out tables (newlines, blank lines, indentation units), measured on
the original text, for the tables the editor adds. Pure."""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import tomlkit
from tomlkit.items import (
    Table,
)

from node_agent.targets.containerd.document import (
    _body,
    _first_value,
    _line_indent,
    _Node,
)

_NEW_FILE_FIELD_INDENT: Final = "  "


_BLANK_LINE_BEFORE_HEADER: Final = re.compile(r"\n[ \t]*\r?\n[ \t]*\[")


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
