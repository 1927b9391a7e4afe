"""The tomlkit document tree: parsing, finding the registry path (`_resolve`), the nodes
and fields of tables, and carrying an edit over onto the file's own lines. Pure."""

from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Final

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import ParseError, TOMLKitError
from tomlkit.items import (
    AoT,
    Comment,
    InlineTable,
    Item,
    Key,
    Null,
    Table,
    Whitespace,
)

from node_agent.targets import FormatError

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


def _child_nodes(parents: Sequence[_Node]) -> list[_Node]:
    """Every table directly in `parents`."""
    return [
        _Node(item, key, parent, parent.depth + 1)
        for parent in parents
        if isinstance(parent.item, (Table, InlineTable))
        for key, item in _body(parent.item)
        if key is not None and isinstance(item, (Table, InlineTable))
    ]
