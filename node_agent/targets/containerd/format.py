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

from collections.abc import Mapping
from copy import deepcopy
from typing import Any, Final

from tomlkit.exceptions import TOMLKitError

from node_agent.credentials import DOCKER_HUB, RegistryAuth
from node_agent.targets import Entry, FormatError, OneEntryPerRegistry, Skip, looks_secret
from node_agent.targets.containerd.document import (
    _body,
    _is_value,
    _on_original_lines,
    _parse_document,
)
from node_agent.targets.containerd.editor import (
    _Editor,
)
from node_agent.targets.containerd.layout import (
    _Layout,
)
from node_agent.targets.containerd.reading import (
    CREDENTIAL_FIELDS,
    PLUGIN_BY_VERSION,
    _configs_in,
    _load,
    _plugin_of,
    _real_changes,
    _verify,
)
from node_agent.targets.containerd.redaction import (
    _credential_tables,
    _redacted_like,
    _tables_with_headers_flag,
)
from node_agent.targets.containerd.rotation import (
    _rotation,
)

#: containerd looks credentials up under the host it contacts; for Docker Hub that is not
#: `docker.io` (docs/node-facts.md#containerd-auth-keys).
DOCKER_HUB_HOST: Final = "registry-1.docker.io"


class ContainerdFormat(OneEntryPerRegistry):
    """`NodeFileFormat` for containerd's config.toml (config versions 2 and 3)."""

    name = "containerd"

    def __init__(self, *, new_file_version: int = 2, memo: "ParsedTexts | None" = None) -> None:
        """`new_file_version`: the config version written when the file does not exist yet.
        `memo`: parses to remember between calls, owned by the caller (one per file and
        worker); without one every call parses its text (the format stays pure either way:
        the memo only saves the parse of a text already seen)."""
        if new_file_version not in PLUGIN_BY_VERSION:
            raise ValueError("new_file_version must be 2 or 3")
        self.new_file_version = new_file_version
        self._memo = memo

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
        if self._memo is not None:
            # The next pass starts by reading the file we are about to write.
            self._memo.put(result, after)
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
        """`_load(text)`, from the memo when there is one: a pass reads the same text two or
        three times."""
        if self._memo is None:
            return _load(text)
        data = self._memo.get(text)
        if data is None:
            data = _load(text)
            self._memo.put(text, data)
        return data


class ParsedTexts:
    """A memo of the last two texts read or rendered, with their tomllib data.

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
