"""Applying auth changes to a tomlkit document: new tables, new fields and removals are
marked by placeholder lines and spliced in as text afterwards (so we, not tomlkit, decide
indentation and blank lines); inline tables are re-rendered on their line. Pure."""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

import tomlkit
from tomlkit.items import (
    Comment,
    InlineTable,
    Item,
    Key,
    KeyType,
    Null,
    SingleKey,
    Table,
    Whitespace,
)

from node_agent.targets import Entry, FormatError
from node_agent.targets.containerd.document import (
    AnyTable,
    _body,
    _child_nodes,
    _container,
    _fields,
    _first_value,
    _Found,
    _key_text,
    _line_indent,
    _Node,
    _resolve,
)
from node_agent.targets.containerd.layout import (
    _Layout,
    _step,
    _Units,
)
from node_agent.targets.containerd.values import (
    _inline_text,
    _literal_safe,
    _parse_value,
    _value_item,
)

_SENTINEL: Final = re.compile("\x00([0-9]+)\x00\n")



# Path indexes of the keys in plugins.PLUGIN.registry.configs.HOST.auth.
_CONFIGS, _HOST, _AUTH = 3, 4, 5


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



def _is_spaced(table: InlineTable) -> bool:
    """Whether the file writes `{ a = 1 }` rather than `{a = 1}`."""
    return table.as_string().startswith("{ ")
