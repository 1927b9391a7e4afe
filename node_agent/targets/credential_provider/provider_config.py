"""The agent's provider entry in the kubelet's `CredentialProviderConfig` (YAML or JSON).

The file may hold other providers (EKS runs `ecr-credential-provider` from its own): the
agent adds, updates or removes only its own entry, by splicing text at the positions the
YAML parser reports, so every other byte of the file stays as it was; each edit is read back
and checked. The kubelet reads the file only when it starts, and refuses a provider without
`matchImages` and a file without providers: with no registry to serve, the agent keeps its
entry as it is rather than leave the kubelet a file it would not start with
(docs/node-facts.md#kubelet-credential-provider).
"""

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import yaml

from node_agent.credentials import Credentials
from node_agent.targets import REDACTED, Desired, Entry, FormatError
from node_agent.targets.credential_provider.plugin import PLUGIN_NAME

KIND: Final = "CredentialProviderConfig"
CONFIG_API_VERSIONS: Final = (
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
)
PROVIDER_API_VERSION: Final = "credentialprovider.kubelet.k8s.io/v1"
#: `matchImages` that match every image of a host of one to six labels, without a port: with
#: them the provider entry, so the file, never changes when a registry is added (a `*` is a
#: whole label, and a pattern matches only hosts of as many labels).
MATCH_ALL: Final = tuple(".".join(["*"] * labels) for labels in range(1, 7))

_NEW_FILE: Final = f"""\
# The kubelet's image credential providers (--image-credential-provider-config), read
# when the kubelet starts. node-agent keeps its own entry; others are left alone.
apiVersion: {CONFIG_API_VERSIONS[0]}
kind: {KIND}
providers:
"""
_DASH_LINE: Final = re.compile(r"[ \t]*-[ \t]+")


class ProviderConfigFormat:
    """`NodeFileFormat` for the kubelet's CredentialProviderConfig: one entry per provider,
    by name; the agent's is `PLUGIN_NAME`."""

    name = "credential-provider-config"

    def __init__(self, *, cache_duration: str = "0s", match_all: bool = False) -> None:
        """`match_all`: the provider matches every image (`MATCH_ALL`, and the registries it
        does not cover), not only the registries of the credentials."""
        self.cache_duration = cache_duration
        self.match_all = match_all

    def desired_entries(
        self, credentials: Credentials, current: Mapping[str, Mapping[str, Any]]
    ) -> Desired:
        # Every registry of the credentials, also one the response skips (an identity token
        # only): the kubelet then asks the plugin and gets no credential for it, as the
        # warning about the skip says, rather than never asking.
        served = sorted(credentials)
        patterns = served
        if self.match_all:
            patterns = [*MATCH_ALL, *(key for key in served if not _matched_by_all(key))]
        if not patterns:
            kept = current.get(PLUGIN_NAME)
            return Desired({PLUGIN_NAME: kept} if kept is not None else {})
        entry = {
            "name": PLUGIN_NAME,
            "matchImages": patterns,
            "defaultCacheDuration": self.cache_duration,
            "apiVersion": PROVIDER_API_VERSION,
        }
        return Desired({PLUGIN_NAME: entry}, registries=len(served))

    def entries(self, text: str | None) -> dict[str, dict[str, Any]]:
        if text is None:
            return {}
        return _providers(_load(text))

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        if text is not None and not updates:
            return text
        result = _NEW_FILE if text is None else text
        expected = self.entries(text)
        for name, entry in updates.items():
            result = _spliced(result, name, entry)
            if entry is None:
                expected.pop(name, None)
            else:
                expected[name] = dict(entry)
        if self.entries(result) != expected:
            raise FormatError("an edit of the provider list did not read back as meant")
        return result

    def redact(self, text: str) -> str:
        """Other providers' `args` and `env` values may be secrets: hidden."""
        document = _load(text)
        for provider in document["providers"]:
            if isinstance(provider.get("args"), list):
                provider["args"] = [REDACTED for _ in provider["args"]]
            for variable in provider.get("env") or []:
                if isinstance(variable, dict) and "value" in variable:
                    variable["value"] = REDACTED
        dumped: str = yaml.safe_dump(document, sort_keys=False)
        return dumped


def _matched_by_all(registry: str) -> bool:
    return ":" not in registry and registry.count(".") < len(MATCH_ALL)


def _load(text: str) -> dict[str, Any]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise FormatError(f"neither valid YAML nor JSON{where}; refusing to edit") from None
    if not isinstance(document, dict) or document.get("kind") != KIND:
        raise FormatError(f"not a {KIND} (kind); refusing to edit")
    if document.get("apiVersion") not in CONFIG_API_VERSIONS:
        raise FormatError(f"apiVersion is none of {', '.join(CONFIG_API_VERSIONS)}")
    if not isinstance(document.get("providers"), list):
        raise FormatError("providers is not a list; refusing to edit")
    return document


def _providers(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    providers: dict[str, dict[str, Any]] = {}
    for index, provider in enumerate(document["providers"]):
        name = provider.get("name") if isinstance(provider, dict) else None
        if not isinstance(name, str):
            raise FormatError(f"providers[{index}].name is missing; refusing to edit")
        if name in providers:
            raise FormatError(f"providers[{index}].name is a duplicate; the kubelet refuses it")
        providers[name] = provider
    return providers


# The splice: text positions from the YAML parser's nodes.


def _spliced(text: str, name: str, entry: Entry | None) -> str:
    sequence = _providers_node(text)
    items = list(sequence.value)
    index = next((i for i, item in enumerate(items) if _name_of(item) == name), None)
    if entry is None:
        return text if index is None else _removed(text, sequence, index)
    if index is not None:
        return _replaced(text, items[index], entry)
    if not items and text.endswith("providers:\n"):
        return text + _block_item(entry, dash_indent=2)  # the new file's empty list
    return _appended(text, sequence, entry)


def _providers_node(text: str) -> yaml.SequenceNode:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "providers" and isinstance(value, yaml.SequenceNode):
                return value
    if text.endswith("providers:\n"):
        return yaml.SequenceNode("tag:yaml.org,2002:seq", [])
    raise FormatError("providers is not a list; refusing to edit")


def _name_of(item: yaml.Node) -> str | None:
    if isinstance(item, yaml.MappingNode):
        for key, value in item.value:
            if key.value == "name" and isinstance(value, yaml.ScalarNode):
                return str(value.value)
    return None


def _replaced(text: str, item: yaml.Node, entry: Entry) -> str:
    if _flow(item):
        start, end = item.start_mark.index, item.end_mark.index
        return text[:start] + _flow_item(entry) + text[end:]
    start, end = item.start_mark.index, _item_end(text, item)
    return text[:start] + _block_item(entry, key_indent=item.start_mark.column) + text[end:]


def _removed(text: str, sequence: yaml.SequenceNode, index: int) -> str:
    items: Sequence[yaml.Node] = sequence.value
    item = items[index]
    if sequence.flow_style:
        if len(items) == 1:
            start, end = item.start_mark.index, item.end_mark.index
        elif index + 1 < len(items):
            start, end = item.start_mark.index, items[index + 1].start_mark.index
        else:
            start, end = items[index - 1].end_mark.index, item.end_mark.index
        return text[:start] + text[end:]
    line_start = _dash_line_start(text, item)
    return text[:line_start] + text[_item_end(text, item) :]


def _appended(text: str, sequence: yaml.SequenceNode, entry: Entry) -> str:
    items: Sequence[yaml.Node] = sequence.value
    if sequence.flow_style:
        if not items:
            start, end = sequence.start_mark.index, sequence.end_mark.index
            return text[:start] + "[" + _flow_item(entry) + "]" + text[end:]
        end = items[-1].end_mark.index
        return text[:end] + ", " + _flow_item(entry) + text[end:]
    last = items[-1]
    if _flow(last):
        raise FormatError("providers mixes block and flow items; refusing to edit")
    end = _item_end(text, last)
    line_start = _dash_line_start(text, last)
    dash_indent = len(text[line_start:end]) - len(text[line_start:end].lstrip(" \t"))
    separator = "" if text[:end].endswith("\n") else "\n"
    new_item = _block_item(entry, dash_indent=dash_indent, key_indent=last.start_mark.column)
    return text[:end] + separator + new_item + text[end:]


def _dash_line_start(text: str, item: yaml.Node) -> int:
    """Where the line of an item's `- ` starts; the item's first key must follow it."""
    start = item.start_mark.index
    line_start = text.rfind("\n", 0, start) + 1
    if not _DASH_LINE.fullmatch(text[line_start:start]):
        raise FormatError("a provider does not start on its `- ` line; refusing to edit")
    return line_start


def _item_end(text: str, item: yaml.Node) -> int:
    """The end of a block item: the end of the line of its last scalar (comments and blank
    lines after it belong to what follows)."""
    last = item
    while isinstance(last, yaml.MappingNode | yaml.SequenceNode) and last.value:
        tail = last.value[-1]
        last = tail[1] if isinstance(last, yaml.MappingNode) else tail
    newline = text.find("\n", last.end_mark.index)
    return len(text) if newline == -1 else newline + 1


def _block_item(entry: Entry, *, dash_indent: int | None = None, key_indent: int = 4) -> str:
    """The entry as a block mapping: after `- ` when `dash_indent` is given, else from the
    first key's position (its other lines at `key_indent`)."""
    if dash_indent is not None:
        key_indent = dash_indent + 2
    pad = " " * key_indent
    lines: list[str] = []
    for key, value in entry.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"  - {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    first = "" if dash_indent is None else " " * dash_indent + "- "
    return first + lines[0] + "\n" + "".join(f"{pad}{line}\n" for line in lines[1:])


def _flow(node: yaml.Node) -> bool:
    return isinstance(node, yaml.nodes.CollectionNode) and bool(node.flow_style)


def _flow_item(entry: Entry) -> str:
    return json.dumps(dict(entry))
