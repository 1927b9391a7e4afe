"""TOML values as the editor writes them: strings quoted like their neighbours, inline
tables and arrays on one line. Pure."""

from collections.abc import Mapping, Sequence
from typing import Any

import tomlkit
from tomlkit.items import (
    Item,
    SingleKey,
    String,
    StringType,
)

from node_agent.targets.containerd.document import (
    _key_text,
)

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

def _inline_text(pairs: Sequence[tuple[str, str]], *, spaced: bool) -> str:
    if not pairs:
        return "{}"
    inner = ", ".join(f"{key} = {value}" for key, value in pairs)
    return f"{{ {inner} }}" if spaced else f"{{{inner}}}"
