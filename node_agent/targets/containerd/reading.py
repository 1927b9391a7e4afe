"""Reading config.toml with the stdlib `tomllib`: the plugin of a config version, the
registry configs, and the check that an edit changed exactly the requested auth tables.
Pure."""

import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, Final

from node_agent.targets import Entry, FormatError

_PARSER_POSITION: Final = re.compile(r"\(at (line \d+, column \d+|end of document)\)\s*$")


CREDENTIAL_FIELDS: Final = frozenset(
    {"username", "password", "auth", "identitytoken", "registrytoken"}
)


#: The CRI plugin holding the registry configuration, by config version
#: (docs/node-facts.md#containerd-auth-location).
PLUGIN_BY_VERSION: Final = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.images"}


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


#: What to do about a config in the v1 layout: let containerd write it in a current one.
_MIGRATE_HINT: Final = (
    "convert it first: `containerd config migrate` (containerd 2.x) or `containerd config "
    "dump` (1.6/1.7) prints it in a current layout"
)


def _plugin_of(data: Mapping[str, Any]) -> str:
    if "version" not in data:
        raise FormatError(
            f"config has no 'version' key (containerd v1 layout); refusing to edit; {_MIGRATE_HINT}"
        )
    version = data["version"]
    if version == 1 and type(version) is int:
        raise FormatError(f"config is 'version = 1'; refusing to edit; {_MIGRATE_HINT}")
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
