"""Credential values, registry header values and secret-looking keys shown as `***`
in a config.toml, for diffs. Pure."""

from collections.abc import Iterator

import tomlkit
from tomlkit.items import (
    AoT,
    Array,
    InlineTable,
    Item,
    Table,
)

from node_agent.targets import REDACTED
from node_agent.targets.containerd.document import (
    AnyTable,
    _body,
)
from node_agent.targets.containerd.values import (
    _parse_value,
    _string_like,
)

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
