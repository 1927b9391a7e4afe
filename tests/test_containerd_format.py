"""containerd's config.toml: only the `auth` tables the agent names change, nothing else moves.

The fixtures are real-looking files: `V2_CONFIG` is `containerd config default` of containerd
1.6.20 (trimmed, 2-space nested indentation) with a node bootstrap's edits and comments, plus
foreign registry entries; `V3_CONFIG` is the containerd 2.x layout (single-quoted keys).
"""

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from hypothesis import given, settings
from hypothesis import strategies as st

from node_agent.credentials import DOCKER_HUB, RegistryAuth
from node_agent.targets import Entry, FormatError, Skip
from node_agent.targets.containerd import ContainerdFormat, ParsedTexts
from node_agent.targets.containerd.format import _edited
from node_agent.targets.containerd.reading import _configs_in, _load, _plugin_of, _real_changes
from node_agent.targets.containerd.rotation import _basic_string, _rotation

CONTAINERD = ContainerdFormat()
CRI = 'plugins."io.containerd.grpc.v1.cri"'
IMAGES = "plugins.'io.containerd.cri.v1.images'"
NEW = {"username": "robot", "password": "s3cret"}


def toml(*lines: str) -> str:
    """A file from its lines."""
    return "".join(line + "\n" for line in lines)


def auth_header(host: str, plugin: str = CRI) -> str:
    return f'[{plugin}.registry.configs."{host}".auth]'


def inserted_after(text: str, line: str, new: str) -> str:
    """`text` with `new` inserted right after its (unique) line `line`."""
    assert text.count(line + "\n") == 1
    return text.replace(line + "\n", line + "\n" + new, 1)


def replaced(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1
    return text.replace(old, new, 1)


V2_CONFIG = """\
# /etc/containerd/config.toml: `containerd config default` (containerd 1.6.20),
# edited by the node bootstrap (SystemdCgroup, sandbox image, a corporate registry).
disabled_plugins = []
imports = []
oom_score = 0
plugin_dir = ""
required_plugins = []
root = "/var/lib/containerd"
state = "/run/containerd"
temp = ""
version = 2

[cgroup]
  path = ""

[grpc]
  address = "/run/containerd/containerd.sock"
  gid = 0
  max_recv_message_size = 16777216
  max_send_message_size = 16777216
  uid = 0

[metrics]
  address = ""
  grpc_histogram = false

[plugins]

  [plugins."io.containerd.gc.v1.scheduler"]
    deletion_threshold = 0
    mutation_threshold = 100
    pause_threshold = 0.02
    schedule_delay = "0s"
    startup_delay = "100ms"

  [plugins."io.containerd.grpc.v1.cri"]
    device_ownership_from_security_context = false
    disable_apparmor = false
    disable_cgroup = false
    disable_tcp_service = true
    enable_selinux = false
    enable_tls_streaming = false
    max_concurrent_downloads = 3
    max_container_log_line_size = 16384
    # pinned by the bootstrap: the default pause image is not mirrored
    sandbox_image = "registry.corp.example/pause:3.9"
    stream_idle_timeout = "4h0m0s"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    systemd_cgroup = false

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/opt/cni/bin"
      conf_dir = "/etc/cni/net.d"
      conf_template = ""
      max_conf_num = 1

    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      disable_snapshot_annotations = true
      discard_unpacked_layers = false
      no_pivot = false
      snapshotter = "overlayfs"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]

        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          base_runtime_spec = ""
          container_annotations = []
          pod_annotations = []
          privileged_without_host_devices = false
          runtime_engine = ""
          runtime_root = ""
          runtime_type = "io.containerd.runc.v2"

          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            BinaryName = ""
            NoNewKeyring = false
            NoPivotRoot = false
            Root = ""
            ShimCgroup = ""
            SystemdCgroup = true # cgroup v2 nodes

    [plugins."io.containerd.grpc.v1.cri".image_decryption]
      key_model = "node"

    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = ""

      [plugins."io.containerd.grpc.v1.cri".registry.auths]

      [plugins."io.containerd.grpc.v1.cri".registry.configs]

        [plugins."io.containerd.grpc.v1.cri".registry.configs."mirror.corp.example:5000".tls]
          insecure_skip_verify = true

        # the corporate registry's robot account, managed by hand
        [plugins."io.containerd.grpc.v1.cri".registry.configs."registry.corp.example".auth]
          username = "corp-robot"
          password = "corp-password"

      [plugins."io.containerd.grpc.v1.cri".registry.headers]

      [plugins."io.containerd.grpc.v1.cri".registry.mirrors]

        [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
          endpoint = ["https://mirror.corp.example:5000", "https://registry-1.docker.io"]

    [plugins."io.containerd.grpc.v1.cri".x509_key_pair_streaming]
      tls_cert_file = ""
      tls_key_file = ""

  [plugins."io.containerd.internal.v1.opt"]
    path = "/opt/containerd"

  [plugins."io.containerd.internal.v1.restart"]
    interval = "10s"

  [plugins."io.containerd.metadata.v1.bolt"]
    content_sharing_policy = "shared"

  [plugins."io.containerd.runtime.v2.task"]
    platforms = ["linux/amd64"]
    sched_core = false

  [plugins."io.containerd.service.v1.diff-service"]
    default = ["walking"]

  [plugins."io.containerd.snapshotter.v1.overlayfs"]
    root_path = ""
    upperdir_label = false

[timeouts]
  "io.containerd.timeout.shim.cleanup" = "5s"
  "io.containerd.timeout.shim.load" = "5s"
  "io.containerd.timeout.shim.shutdown" = "3s"
  "io.containerd.timeout.task.state" = "2s"

[ttrpc]
  address = ""
  gid = 0
  uid = 0
"""

#: The same node without any registry section.
V2_NO_REGISTRY = re.sub(
    r"\n    \[plugins\.\"io\.containerd\.grpc\.v1\.cri\"\.registry\].*?\n\n(?=    \[)",
    "\n",
    V2_CONFIG,
    flags=re.DOTALL,
)

V3_CONFIG = """\
version = 3
root = '/var/lib/containerd'
state = '/run/containerd'
temp = ''
plugin_dir = ''
disabled_plugins = []
required_plugins = []
oom_score = 0
imports = []

[grpc]
  address = '/run/containerd/containerd.sock'
  uid = 0
  gid = 0

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    disable_snapshot_annotations = true
    discard_unpacked_layers = false
    max_concurrent_downloads = 3
    image_pull_progress_timeout = '5m0s'

    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'registry.k8s.io/pause:3.10'

    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'

    [plugins.'io.containerd.cri.v1.images'.image_decryption]
      key_model = 'node'

  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    max_container_log_line_size = 16384

    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'

      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'

        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          SystemdCgroup = true

  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
    stream_server_address = '127.0.0.1'

[timeouts]
  'io.containerd.timeout.shim.cleanup' = '5s'
  'io.containerd.timeout.shim.load' = '5s'
"""

#: A hand-written, unindented file (kubeadm-style): no blank lines between tables.
FLAT_CONFIG = f"""\
version = 2
[{CRI}]
sandbox_image = "registry.k8s.io/pause:3.9"
[{CRI}.containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"
[{CRI}.containerd.runtimes.runc.options]
SystemdCgroup = true
[metrics]
address = "127.0.0.1:1338"
"""

#: hosts.toml directories plus legacy mirrors: both must stay exactly as they are.
CONFIG_PATH_AND_MIRRORS = f"""\
version = 2

[{CRI}.registry]
  config_path = "/etc/containerd/certs.d"

[{CRI}.registry.mirrors."docker.io"]
  endpoint = ["https://mirror.example"]
"""

#: Nothing but what the agent would write into an empty node.
MINIMAL = "version = 2\n"

#: tomlkit re-indents the second child of an implicit table (`configs` here) when it renders
#: the file; the agent must still leave that line alone.
TOMLKIT_REINDENTS = toml(
    "version = 2",
    f"[{CRI}.containerd]",
    '  snapshotter = "overlayfs"',
    "",
    f"  [{CRI}.registry.mirrors]",
    "",
    f"  [{CRI}.registry.configs]",
)

#: What install scripts often do: auth tables appended at the end, after other tables.
APPENDED_AT_THE_END = V2_NO_REGISTRY + toml(
    "", auth_header("registry.corp.example"), '  username = "corp-robot"'
)


# desired_entry


def test_docker_hub_is_written_under_the_host_containerd_contacts() -> None:
    result = CONTAINERD.desired_entry(DOCKER_HUB, RegistryAuth("u", "p"))
    assert result == ("registry-1.docker.io", {"username": "u", "password": "p"})


@pytest.mark.parametrize(
    ("auth", "entry"),
    [
        (RegistryAuth("u", "p"), {"username": "u", "password": "p"}),
        (RegistryAuth(identitytoken="tok"), {"identitytoken": "tok"}),
        (RegistryAuth("u", "p", identitytoken="tok"), {"username": "u", "password": "p"}),
        (RegistryAuth(password="only"), {"auth": "Om9ubHk="}),
    ],
    ids=["username+password", "identitytoken", "username wins", "password only as auth"],
)
def test_entry_holds_the_field_containerd_will_use(auth: RegistryAuth, entry: Entry) -> None:
    assert CONTAINERD.desired_entry("reg.example", auth) == ("reg.example", entry)


def test_empty_credential_is_skipped_with_a_reason() -> None:
    result = CONTAINERD.desired_entry("reg.example", RegistryAuth())
    assert isinstance(result, Skip) and "no username" in result.reason


def test_only_versions_2_and_3_can_be_created() -> None:
    with pytest.raises(ValueError, match="2 or 3"):
        ContainerdFormat(new_file_version=1)


# entries


ENTRIES_CASES = [
    ("missing file", None, {}),
    ("no registry section", V2_NO_REGISTRY, {}),
    (
        "standard tables",
        V2_CONFIG,
        {"registry.corp.example": {"username": "corp-robot", "password": "corp-password"}},
    ),
    (
        "v3 plugin",
        V3_CONFIG + toml(auth_header("r", IMAGES), 'auth = "eDp5"'),
        {"r": {"auth": "eDp5"}},
    ),
    ("v2 ignores the v3 plugin", MINIMAL + toml(auth_header("r", IMAGES), 'auth = "x"'), {}),
    (
        "dotted keys",
        MINIMAL
        + toml(f'[{CRI}.registry.configs."r"]', 'auth.username = "u"', 'auth.password = "p"'),
        {"r": {"username": "u", "password": "p"}},
    ),
    (
        "inline table",
        MINIMAL
        + toml(f"[{CRI}.registry]", 'configs = { "r" = { auth = { identitytoken = "t" } } }'),
        {"r": {"identitytoken": "t"}},
    ),
    (
        "tls only is no entry",
        MINIMAL + toml(f'[{CRI}.registry.configs."r".tls]', "insecure_skip_verify = true"),
        {},
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in ENTRIES_CASES], ids=[c[0] for c in ENTRIES_CASES]
)
def test_entries_are_the_auth_tables_of_the_files_plugin(
    text: str | None, expected: dict[str, dict[str, Any]]
) -> None:
    assert CONTAINERD.entries(text) == expected


# render: what changes, exactly


AGENT_TABLE_V2 = toml(
    "",
    "        " + auth_header("reg.example"),
    '          username = "robot"',
    '          password = "s3cret"',
)

RENDER_CASES = [
    (
        "new table follows the last configs table and copies its indentation",
        V2_CONFIG,
        {"reg.example": NEW},
        inserted_after(V2_CONFIG, '          password = "corp-password"', AGENT_TABLE_V2),
    ),
    (
        "no registry section: new table ends the plugin, indented as containerd would",
        V2_NO_REGISTRY,
        {"reg.example": NEW},
        inserted_after(
            V2_NO_REGISTRY,
            '      tls_key_file = ""',
            toml(
                "",
                "          " + auth_header("reg.example"),
                '            username = "robot"',
                '            password = "s3cret"',
            ),
        ),
    ),
    (
        "v3 file: the images plugin, the file's quote style where the value allows",
        V3_CONFIG,
        {"reg.example": {"username": "robot", "password": "it's"}},
        inserted_after(
            V3_CONFIG,
            "      config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'",
            toml(
                "",
                "          " + auth_header("reg.example", IMAGES),
                "            username = 'robot'",
                '            password = "it\'s"',
            ),
        ),
    ),
    (
        "flat file without blank lines stays flat",
        FLAT_CONFIG,
        {"reg.example": NEW},
        inserted_after(
            FLAT_CONFIG,
            "SystemdCgroup = true",
            toml(auth_header("reg.example"), 'username = "robot"', 'password = "s3cret"'),
        ),
    ),
    (
        "config_path and mirrors are left alone; nothing but auth is added",
        CONFIG_PATH_AND_MIRRORS,
        {"reg.example": NEW},
        CONFIG_PATH_AND_MIRRORS
        + toml("", auth_header("reg.example"), '  username = "robot"', '  password = "s3cret"'),
    ),
    (
        "auth tables appended at the end of the file: the new one follows them",
        APPENDED_AT_THE_END,
        {"reg.example": {"auth": "eDp5"}},
        APPENDED_AT_THE_END + toml("", auth_header("reg.example"), '  auth = "eDp5"'),
    ),
    (
        "lines tomlkit would re-indent are left as they are",
        TOMLKIT_REINDENTS,
        {"reg.example": {"auth": "eDp5"}},
        TOMLKIT_REINDENTS + toml("", "    " + auth_header("reg.example"), '      auth = "eDp5"'),
    ),
    (
        "updating a password is a one-line change",
        V2_CONFIG,
        {"registry.corp.example": {"username": "corp-robot", "password": "rotated"}},
        replaced(V2_CONFIG, 'password = "corp-password"', 'password = "rotated"'),
    ),
    (
        "fields are replaced in place, dropped, and new ones follow the last one",
        V2_CONFIG,
        {"registry.corp.example": {"password": "rotated", "identitytoken": "tok"}},
        replaced(
            V2_CONFIG,
            toml('          username = "corp-robot"', '          password = "corp-password"'),
            toml('          password = "rotated"', '          identitytoken = "tok"'),
        ),
    ),
    (
        "removing a host's auth keeps its tls table",
        MINIMAL
        + toml("", f'[{CRI}.registry.configs."r".tls]', '  ca_file = "/ca.pem"')
        + toml("", auth_header("r"), '  username = "u"'),
        {"r": None},
        MINIMAL + toml("", f'[{CRI}.registry.configs."r".tls]', '  ca_file = "/ca.pem"'),
    ),
    (
        "an explicit host table left empty goes too",
        MINIMAL
        + toml("", f'[{CRI}.registry.configs."r"]', "", auth_header("r"), '  username = "u"')
        + toml("", "[metrics]", '  address = ""'),
        {"r": None},
        MINIMAL + toml("", "[metrics]", '  address = ""'),
    ),
    (
        "a comment introducing the next table stays above it",
        MINIMAL
        + toml("", auth_header("a"), '  username = "u"')
        + toml("", "# metrics for the node exporter", "[metrics]", '  address = ""'),
        {"b": {"auth": "eDp5"}},
        MINIMAL
        + toml("", auth_header("a"), '  username = "u"')
        + toml("", auth_header("b"), '  auth = "eDp5"')
        + toml("", "# metrics for the node exporter", "[metrics]", '  address = ""'),
    ),
    (
        "hosts are always quoted keys",
        MINIMAL,
        {"localhost": {"auth": "eDp5"}, "127.0.0.1:5000": {"auth": "eDp5"}},
        MINIMAL
        + toml(f'[{CRI}.registry.configs."localhost".auth]', 'auth = "eDp5"')
        + toml(f'[{CRI}.registry.configs."127.0.0.1:5000".auth]', 'auth = "eDp5"'),
    ),
    (
        "a restored entry is written with every field it had",
        MINIMAL,
        {"r": {"username": "u", "password": "p", "email": "ops@example", "x-retries": 3}},
        MINIMAL
        + toml(
            auth_header("r"),
            'username = "u"',
            'password = "p"',
            'email = "ops@example"',
            "x-retries = 3",
        ),
    ),
    (
        "values are escaped, never break the file",
        MINIMAL,
        {"r": {"password": 'a"b\\c\nd'}},
        MINIMAL + toml(auth_header("r"), 'password = "a\\"b\\\\c\\nd"'),
    ),
    (
        "CRLF line endings are kept",
        V2_CONFIG.replace("\n", "\r\n"),
        {"reg.example": NEW},
        inserted_after(V2_CONFIG, '          password = "corp-password"', AGENT_TABLE_V2).replace(
            "\n", "\r\n"
        ),
    ),
    (
        "dotted keys are edited where they are",
        MINIMAL
        + toml(
            f'[{CRI}.registry.configs."r"]',
            '  auth.username = "u" # robot',
            '  auth.password = "p"',
            "  tls.insecure_skip_verify = true",
        ),
        {"r": {"username": "u2", "identitytoken": "t"}},
        MINIMAL
        + toml(
            f'[{CRI}.registry.configs."r"]',
            '  auth.username = "u2" # robot',
            '  auth.identitytoken = "t"',
            "  tls.insecure_skip_verify = true",
        ),
    ),
    (
        "dotted auth removed, the host's tls stays",
        MINIMAL
        + toml(
            f'[{CRI}.registry.configs."r"]',
            '  auth.username = "u"',
            "  tls.insecure_skip_verify = true",
        ),
        {"r": None},
        MINIMAL + toml(f'[{CRI}.registry.configs."r"]', "  tls.insecure_skip_verify = true"),
    ),
    (
        "inline auth table is re-rendered on its line",
        MINIMAL
        + toml(
            f'[{CRI}.registry.configs."r"]', '  auth = { username = "u", password = "p" } # kept'
        ),
        {"r": {"username": "u", "password": "rotated"}},
        MINIMAL
        + toml(
            f'[{CRI}.registry.configs."r"]',
            '  auth = { username = "u", password = "rotated" } # kept',
        ),
    ),
    (
        "inline configs table gains a host on its line",
        MINIMAL + toml(f"[{CRI}.registry]", '  configs = { "a" = { tls = { ca_file = "c" } } }'),
        {"b": {"auth": "eDp5"}},
        MINIMAL
        + toml(
            f"[{CRI}.registry]",
            '  configs = { "a" = { tls = { ca_file = "c" } }, "b" = { auth = { auth = "eDp5" } } }',
        ),
    ),
    (
        "inline registry table gains configs on its line",
        MINIMAL + toml(f"[{CRI}]", '  registry = { config_path = "" }'),
        {"r": {"auth": "eDp5"}},
        MINIMAL
        + toml(
            f"[{CRI}]",
            '  registry = { config_path = "", configs = { "r" = { auth = { auth = "eDp5" } } } }',
        ),
    ),
    (
        "inline host left empty is dropped from the inline configs",
        MINIMAL
        + toml(f"[{CRI}.registry]", '  configs = { "a" = { auth = { auth = "eDp5" } }, "b" = {} }'),
        {"a": None},
        MINIMAL + toml(f"[{CRI}.registry]", '  configs = { "b" = {} }'),
    ),
]


@pytest.mark.parametrize(
    ("text", "updates", "expected"), [c[1:] for c in RENDER_CASES], ids=[c[0] for c in RENDER_CASES]
)
def test_render(text: str, updates: Mapping[str, Entry | None], expected: str) -> None:
    assert CONTAINERD.render(text, updates) == expected


@pytest.mark.parametrize(
    ("version", "plugin"), [(2, CRI), (3, 'plugins."io.containerd.cri.v1.images"')]
)
def test_missing_file_becomes_a_minimal_file_of_the_configured_version(
    version: int, plugin: str
) -> None:
    text = ContainerdFormat(new_file_version=version).render(
        None, {"reg.example": NEW, "127.0.0.1:5000": {"identitytoken": "t"}}
    )
    assert text == (
        f"version = {version}\n\n"
        f'[{plugin}.registry.configs."reg.example".auth]\n'
        '  username = "robot"\n  password = "s3cret"\n\n'
        f'[{plugin}.registry.configs."127.0.0.1:5000".auth]\n  identitytoken = "t"\n'
    )


def test_missing_file_with_nothing_to_write_is_just_the_version() -> None:
    assert ContainerdFormat(new_file_version=3).render(None, {"r": None}) == "version = 3\n"
    assert ContainerdFormat().render(None, {}) == "version = 2\n"


ROUND_TRIP_FILES = {
    "v2 default": V2_CONFIG,
    "v2 without registry": V2_NO_REGISTRY,
    "v3 default": V3_CONFIG,
    "flat": FLAT_CONFIG,
    "config_path and mirrors": CONFIG_PATH_AND_MIRRORS,
    "minimal": MINIMAL,
    "appended at the end": APPENDED_AT_THE_END,
    "tomlkit re-indents": TOMLKIT_REINDENTS,
    "ends with a blank line": 'version = 2\n[metrics]\naddress = ""\n\n',
    "CRLF": V2_CONFIG.replace("\n", "\r\n"),
}


@pytest.mark.parametrize("text", ROUND_TRIP_FILES.values(), ids=ROUND_TRIP_FILES.keys())
def test_adding_then_removing_gives_back_the_original_bytes(text: str) -> None:
    hosts = {"reg.example": NEW, "registry-1.docker.io": {"auth": "eDp5"}}
    added = CONTAINERD.render(text, hosts)
    assert CONTAINERD.render(added, dict.fromkeys(hosts)) == text
    one_removed = CONTAINERD.render(added, {"reg.example": None})
    assert CONTAINERD.render(one_removed, {"registry-1.docker.io": None}) == text


@pytest.mark.parametrize("text", ROUND_TRIP_FILES.values(), ids=ROUND_TRIP_FILES.keys())
def test_no_updates_and_no_op_updates_return_the_text_unchanged(text: str) -> None:
    assert CONTAINERD.render(text, {}) is text
    current = CONTAINERD.entries(text)
    assert CONTAINERD.render(text, {**current, "absent.example": None}) == text


INLINE_FILES = {
    "inline registry": MINIMAL + toml(f"[{CRI}]", '  registry = { config_path = "" }  # hosts'),
    "inline configs": MINIMAL
    + toml(f"[{CRI}.registry]", '  configs = {"a" = {tls = {insecure_skip_verify = true}}}'),
    "inline host": MINIMAL + toml(f"[{CRI}.registry.configs]", '  "reg.example" = { tls = {} }'),
}


@pytest.mark.parametrize("text", INLINE_FILES.values(), ids=INLINE_FILES.keys())
def test_inline_tables_edited_and_restored_keep_their_line(text: str) -> None:
    added = CONTAINERD.render(text, {"reg.example": NEW})
    assert CONTAINERD.entries(added) == {"reg.example": NEW}
    assert added.count("\n") == text.count("\n")
    assert CONTAINERD.render(added, {"reg.example": None}) == text


def test_no_updates_return_even_an_unreadable_text_unchanged() -> None:
    assert CONTAINERD.render("[[[", {}) == "[[["


# render: what is refused


#: A parent table's header after its child's, across another table (tomlkit issue #571: tomlkit
#: before 0.15.3 could not load it; 0.15.3 edits it, and tomllib and containerd agree).
TOMLKIT_571_SHAPE = toml(
    "version = 2",
    f"[{CRI}]",
    auth_header("a"),
    'username = "SECRET"',
    f"[{CRI}.registry]",
    '[plugins."io.containerd.internal.v1.opt"]',
    f'[{CRI}.registry.mirrors."docker.io"]',
    'endpoint = ["SECRET"]',
)

#: An indented child table before its parent (tomlkit before 0.15.3 could not load it either).
CHILD_BEFORE_PARENT = toml(
    "version = 2",
    "  " + auth_header("a"),
    '  username = "SECRET"',
    f"[{CRI}.registry]",
    'config_path = ""',
)

REFUSED_CASES = [
    (
        "no version (v1 layout)",
        toml('root = "/var/lib/containerd"', "[plugins.cri.registry.auths]"),
        "no 'version' key (containerd v1 layout); refusing to edit; convert it first: "
        "`containerd config migrate`",
    ),
    ("version 1", "version = 1\n", "'version = 1'; refusing to edit; convert it first: `con"),
    ("version as a string", 'version = "2"\n', "neither 2 nor 3"),
    (
        "unparseable TOML",
        toml("version = 2", "[a]", "password = hunter2-SECRET"),
        "not valid TOML (at line 3, column 12)",
    ),
    ("control character in a value", toml("version = 2", 'x = "SECRET\x01"'), "line 2"),
    (
        "configs is a value",
        toml("version = 2", f"[{CRI}.registry]", 'configs = "SECRET"'),
        "'configs' on the registry path is not a table",
    ),
    (
        "auth is a value",
        toml("version = 2", f'[{CRI}.registry.configs."r"]', 'auth = "SECRET"'),
        "registry.configs entry is not a table",
    ),
    (
        "dotted keys inside an inline table",
        toml("version = 2", f"[{CRI}.registry]", 'configs = { "r".auth.username = "SECRET" }'),
        "dotted keys inside an inline",
    ),
]


@pytest.mark.parametrize(
    ("text", "problem"), [c[1:] for c in REFUSED_CASES], ids=[c[0] for c in REFUSED_CASES]
)
def test_files_it_cannot_edit_safely_are_refused_without_quoting_them(
    text: str, problem: str
) -> None:
    with pytest.raises(FormatError, match=re.escape(problem)) as refused:
        CONTAINERD.render(text, {"r": NEW})
    assert "SECRET" not in str(refused.value) and "hunter2" not in str(refused.value)
    assert refused.value.__cause__ is None  # parser messages may quote the file


def test_the_tomlkit_571_shape_is_still_readable() -> None:
    assert CONTAINERD.entries(TOMLKIT_571_SHAPE) == {"a": {"username": "SECRET"}}


@pytest.mark.parametrize(
    "text", [TOMLKIT_571_SHAPE, CHILD_BEFORE_PARENT], ids=["tomlkit #571", "child before parent"]
)
def test_parent_tables_after_their_children_are_edited_in_place(text: str) -> None:
    updates = {"a": {"username": "x", "password": "y"}, "r": NEW}
    edited = CONTAINERD.render(text, updates)
    assert CONTAINERD.entries(edited) == updates
    header = auth_header("a")
    indent = text[: text.index(header)].rsplit("\n", 1)[-1]
    new_table = "".join(
        f"{indent}{line}\n"
        for line in (auth_header("r"), 'username = "robot"', 'password = "s3cret"')
    )
    assert edited == text.replace(
        f'{indent}username = "SECRET"\n',
        f'{indent}username = "x"\n{indent}password = "y"\n{new_table}',
    )
    assert CONTAINERD.render(edited, {"a": {"username": "SECRET"}, "r": None}) == text


# redact


def test_redact_hides_every_credential_value_and_keeps_the_rest() -> None:
    text = (
        V2_CONFIG
        + '\n[plugins.cri.registry.auths."https://legacy.example"]\n  password = "SECRET-1"\n'
        + f'\n[{IMAGES}.registry.configs."v3.example".auth]\n  registrytoken = "SECRET-2"\n'
        + f'\n[{CRI}.registry.configs."dotted.example"]\n  auth.identitytoken = "SECRET-3"\n'
        + "  auth.auth = 'SECRET-4'\n"
        + f'\n[{CRI}.registry.auths]\n  "https://inline.example" = {{ username = "SECRET-5" }}\n'
    )
    redacted = CONTAINERD.redact(text)
    for secret in ["corp-robot", "corp-password", "SECRET"]:
        assert secret not in redacted
    assert redacted.count('"***"') + redacted.count("'***'") == 7
    assert redacted == re.sub(r"(corp-robot|corp-password|SECRET-\d)", "***", text)


@pytest.mark.parametrize(
    "text",
    [
        toml("version = 2", f'[[{CRI}.registry.configs."r".auth]]', 'password = "SECRET"'),
        toml("version = 2", f"[{CRI}.registry]", 'auths = [{ password = "SECRET" }]'),
        toml(f'{CRI}.registry.configs."r".auth.password = "SECRET"'),
        toml("[plugins.cri.registry.auths.r]", 'password = """SECRET"""'),
    ],
    ids=["array of tables", "array of inline tables", "top-level dotted key", "v1 layout"],
)
def test_redact_also_hides_values_containerd_would_not_even_load(text: str) -> None:
    redacted = CONTAINERD.redact(text)
    assert "SECRET" not in redacted
    assert redacted.count("***") == 1


def test_redact_refuses_a_file_it_cannot_read_without_quoting_it() -> None:
    with pytest.raises(FormatError, match=r"tomlkit cannot load this config \(line 2") as refused:
        CONTAINERD.redact(toml("[a]", "password = hunter2-SECRET"))
    assert "SECRET" not in str(refused.value)


def test_redact_reads_parent_tables_after_their_children() -> None:
    assert CONTAINERD.redact(TOMLKIT_571_SHAPE) == replaced(
        TOMLKIT_571_SHAPE, 'username = "SECRET"', 'username = "***"'
    )


# properties


AGENT_HOSTS = ["reg.example", "127.0.0.1:5000", "registry-1.docker.io", "localhost", "a-b.c:443"]
FIELD_NAMES = ["username", "password", "auth", "identitytoken"]
entries_strategy = st.dictionaries(st.sampled_from(FIELD_NAMES), st.text(max_size=12), min_size=1)
updates_strategy = st.dictionaries(
    st.sampled_from(AGENT_HOSTS), st.none() | entries_strategy, min_size=1, max_size=4
)


def is_subsequence(lines: list[str], of: list[str]) -> bool:
    remaining = iter(of)
    return all(line in remaining for line in lines)


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from(list(ROUND_TRIP_FILES)),
    steps=st.lists(updates_strategy, min_size=1, max_size=5),
)
def test_random_edits_keep_foreign_content_and_do_exactly_what_was_asked(
    base: str, steps: list[dict[str, Entry | None]]
) -> None:
    original = ROUND_TRIP_FILES[base]
    text, model = original, CONTAINERD.entries(original)
    for updates in steps:
        text = CONTAINERD.render(text, updates)
        for host, entry in updates.items():
            if entry is None:
                model.pop(host, None)
            else:
                model[host] = dict(entry)
        assert CONTAINERD.entries(text) == model
        assert is_subsequence(original.splitlines(), text.splitlines())
        assert CONTAINERD.render(text, updates) == text
    assert CONTAINERD.render(text, dict.fromkeys(AGENT_HOSTS)) == original


ODD_LAYOUTS = [
    'version = 2\n[metrics]\naddress = ""',  # no final newline
    MINIMAL + f'{CRI}.registry.configs."localhost".auth.username = "u"\n[metrics]\n',
    MINIMAL + f'[{CRI}.registry.configs."reg.example"]\nauth.username = "u"\ntls.ca_file = "c"\n',
    MINIMAL + f'[{CRI}.registry]\nconfigs = {{ "localhost" = {{ auth = {{ auth = "x" }} }} }}\n',
    MINIMAL + f'[{CRI}.registry.configs."localhost"]\nauth = {{ username = "u" }}\n',
    MINIMAL + f'[{CRI}.registry.configs."a-b.c:443".auth]\nusername = "u"\n[x]\n'
    f'[{CRI}.registry.configs."127.0.0.1:5000".auth]\nusername = "u"\n',
]


@settings(max_examples=100, deadline=None)
@given(base=st.sampled_from(ODD_LAYOUTS), steps=st.lists(updates_strategy, min_size=1, max_size=4))
def test_random_edits_of_odd_layouts_change_only_the_named_entries(
    base: str, steps: list[dict[str, Entry | None]]
) -> None:
    text, model = base, CONTAINERD.entries(base)
    other = {key: value for key, value in tomllib.loads(base).items() if key != "plugins"}
    for updates in steps:
        text = CONTAINERD.render(text, updates)
        for host, entry in updates.items():
            if entry is None:
                model.pop(host, None)
            else:
                model[host] = dict(entry)
        assert CONTAINERD.entries(text) == model
        assert {k: v for k, v in tomllib.loads(text).items() if k != "plugins"} == other


# the fast path: a password rotation as a line edit


def _rotate_in_place(
    text: str, changes: Mapping[str, Entry | None], *, data: Mapping[str, Any] | None = None
) -> str | None:
    """What the fast path makes of `text` (parsed: `data`), as `render` calls it; None when
    it declines."""
    try:
        data = _load(text) if data is None else data
        plugin = _plugin_of(data)
    except FormatError:
        return None
    rotated = _rotation(text, data, plugin, changes)
    return None if rotated is None else rotated[0]


def with_agent_table(text: str) -> str:
    """`text` after the agent wrote its `reg.example` table (through the general path)."""
    return CONTAINERD.render(text, {"reg.example": NEW})


def slow_render(text: str, updates: Mapping[str, Entry | None]) -> str:
    """What the general (tomlkit) path renders for `updates`."""
    data = tomllib.loads(text)
    plugin = _plugin_of(data)
    changes = _real_changes(_configs_in(data, plugin), updates)
    return _edited(text, data, plugin, changes, new_file=False)[0]


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.split("\n"), after.split("\n")
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = (REPO_ROOT / "node_agent/demo/node/etc/containerd/config.toml").read_text()
BENCH_CONFIG = (REPO_ROOT / "bench/containerd-config-150.toml").read_text()
IMAGE_BUILDER = "registry.internal.example:5000"
ROTATED = {"username": "robot", "password": "rotated"}

ROTATION_CASES = [
    (
        "v2, a hand-written table",
        V2_CONFIG,
        {"registry.corp.example": {"username": "corp-robot", "password": "rotated"}},
    ),
    ("v2, the agent's table", with_agent_table(V2_CONFIG), {"reg.example": ROTATED}),
    (
        "v3, single-quoted values stay single-quoted",
        with_agent_table(V3_CONFIG),
        {"reg.example": ROTATED},
    ),
    (
        "v3, a value that cannot be single-quoted becomes a basic string",
        with_agent_table(V3_CONFIG),
        {"reg.example": {"username": "robot", "password": "it's"}},
    ),
    ("flat file", with_agent_table(FLAT_CONFIG), {"reg.example": ROTATED}),
    ("CRLF", with_agent_table(V2_CONFIG.replace("\n", "\r\n")), {"reg.example": ROTATED}),
    (
        "auth table at the end of the file",
        APPENDED_AT_THE_END,
        {"registry.corp.example": {"username": "rotated-robot"}},
    ),
    (
        "quoted keys, spaces inside the header brackets, comments",
        MINIMAL
        + toml(
            "",
            "  [ plugins . \"io.containerd.grpc.v1.cri\" . registry . configs . 'r' . auth ] #a",
            '    "username" = "u"',
            "    'password'='p'   # rotated monthly",
            "",
            "[metrics]",
            '  address = ""',
        ),
        {"r": {"username": "u", "password": "q#not-a-comment"}},
    ),
    (
        "comments after values and at the end of the table",
        MINIMAL
        + toml(
            auth_header("r"),
            'username = "u" # robot account',
            'password = "p"#no space',
            "# the next table is not ours",
            "[x]",
            'password = "p"',
        ),
        {"r": {"username": "u2", "password": "p2"}},
    ),
    (
        "old values with escapes, new values needing them",
        MINIMAL + toml(auth_header("r"), 'password = "a\\"b\\\\c\\u00e9"'),
        {"r": {"password": 'new"\\\n\t\x00\x7f\U0001f600'}},
    ),
    (
        "no final newline",
        MINIMAL + toml(auth_header("r"), 'username = "u"') + 'password = "p"',
        {"r": {"username": "u", "password": "q"}},
    ),
    (
        "two hosts, every field",
        with_agent_table(V2_CONFIG),
        {
            "reg.example": ROTATED,
            "registry.corp.example": {"username": "robot-2", "password": "rotated-2"},
        },
    ),
    (
        "unchanged fields of other types are left alone",
        MINIMAL + toml(auth_header("r"), 'password = "p"', "x-retries = 3"),
        {"r": {"password": "q", "x-retries": 3}},
    ),
    ("demo config", DEMO_CONFIG, {IMAGE_BUILDER: {"username": "image-builder", "password": "q"}}),
    ("bench config", BENCH_CONFIG, {IMAGE_BUILDER: {"username": "image-builder", "password": "q"}}),
]


@pytest.mark.parametrize(
    ("text", "updates"), [c[1:] for c in ROTATION_CASES], ids=[c[0] for c in ROTATION_CASES]
)
def test_rotation_is_a_line_edit_with_the_same_bytes_as_the_general_path(
    text: str, updates: Mapping[str, Entry]
) -> None:
    fast = _rotate_in_place(text, updates)
    assert fast is not None, "the fast path declined"
    assert fast == slow_render(text, updates)
    assert ContainerdFormat().render(text, updates) == fast
    changed_fields = sum(
        value != CONTAINERD.entries(text)[host].get(name)
        for host, entry in updates.items()
        for name, value in entry.items()
    )
    assert len(changed_lines(text, fast)) == changed_fields


STALE_DATA = tomllib.loads(replaced(V2_CONFIG, "oom_score = 0", "oom_score = 1"))

DECLINED_CASES = [
    (
        "inline auth table",
        MINIMAL
        + toml(f'[{CRI}.registry.configs."r"]', '  auth = { username = "u", password = "p" }'),
        {"r": {"username": "u", "password": "q"}},
    ),
    (
        "inline configs table",
        MINIMAL + toml(f"[{CRI}.registry]", '  configs = { "r" = { auth = { auth = "x" } } }'),
        {"r": {"auth": "y"}},
    ),
    (
        "dotted keys",
        MINIMAL
        + toml(f'[{CRI}.registry.configs."r"]', '  auth.username = "u"', '  auth.password = "p"'),
        {"r": {"username": "u", "password": "q"}},
    ),
    (
        "a field added",
        V2_CONFIG,
        {
            "registry.corp.example": {
                "username": "corp-robot",
                "password": "q",
                "identitytoken": "t",
            }
        },
    ),
    ("a field removed", V2_CONFIG, {"registry.corp.example": {"password": "q"}}),
    ("a new host", V2_CONFIG, {"reg.example": NEW}),
    ("a host removed", V2_CONFIG, {"registry.corp.example": None}),
    (
        "a value that is not a string",
        MINIMAL + toml(auth_header("r"), 'password = "p"', "x-retries = 3"),
        {"r": {"password": "p", "x-retries": 4}},
    ),
    (
        "a string replaced by another type",
        MINIMAL + toml(auth_header("r"), 'password = "p"'),
        {"r": {"password": 4}},
    ),
    (
        "a multi-line string value",
        MINIMAL + toml(auth_header("r"), 'username = "u"', 'password = """p"""'),
        {"r": {"username": "u", "password": "q"}},
    ),
    (
        "a multi-line string elsewhere, where a line could look like a header",
        MINIMAL
        + toml(
            'note = """',
            auth_header("r"),
            'password = "p"',
            '"""',
            auth_header("r"),
            'password = "p"',
        ),
        {"r": {"password": "q"}},
    ),
    (
        "a host key written with escapes",
        MINIMAL + toml(f'[{CRI}.registry.configs."r\\u0065g".auth]', 'password = "p"'),
        {"reg": {"password": "q"}},
    ),
    (
        "a sub-table under auth",
        MINIMAL + toml(auth_header("r"), 'password = "p"', f'[{CRI}.registry.configs."r".auth.x]'),
        {"r": {"password": "q"}},
    ),
    (
        "the value on a line of its own",
        MINIMAL + toml(auth_header("r"), "password = [", '"p" ]'),
        {"r": {"password": "q"}},
    ),
]


@pytest.mark.parametrize(
    ("text", "updates"), [c[1:] for c in DECLINED_CASES], ids=[c[0] for c in DECLINED_CASES]
)
def test_anything_but_a_simple_rotation_is_left_to_the_general_path(
    text: str, updates: Mapping[str, Entry | None]
) -> None:
    assert _rotate_in_place(text, updates) is None
    assert ContainerdFormat().render(text, updates) == slow_render(text, updates)


def test_a_rotation_that_fails_the_check_is_declined() -> None:
    # Data of another text: the edit is right on the lines, but not what the data says.
    updates = {"registry.corp.example": {"username": "corp-robot", "password": "q"}}
    assert _rotate_in_place(V2_CONFIG, updates, data=STALE_DATA) is None
    assert _rotate_in_place(V2_CONFIG, updates, data=tomllib.loads(V2_CONFIG)) is not None


def test_rotation_declines_files_it_cannot_read() -> None:
    for text in ["[[[", "version = 1\n", 'version = 2\nplugins = "x"\n']:
        assert _rotate_in_place(text, {"a": {"username": "x"}}) is None


def test_a_parent_table_after_its_child_is_rotated_on_its_lines() -> None:
    rotated = CONTAINERD.render(TOMLKIT_571_SHAPE, {"a": {"username": "x"}})
    assert rotated == replaced(TOMLKIT_571_SHAPE, 'username = "SECRET"', 'username = "x"')


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_basic_strings_round_trip_through_tomllib(value: str) -> None:
    assert tomllib.loads(f"v = {_basic_string(value)}\n") == {"v": value}
    if '"""' not in value:  # tomlkit writes `""\"` there; both are valid
        assert _basic_string(value) == tomlkit.string(value).as_string()


ROTATABLE = {
    "v2": (with_agent_table(V2_CONFIG), "reg.example"),
    "v3": (with_agent_table(V3_CONFIG), "reg.example"),
    "CRLF": (with_agent_table(V2_CONFIG.replace("\n", "\r\n")), "reg.example"),
    "flat": (with_agent_table(FLAT_CONFIG), "reg.example"),
    "demo": (DEMO_CONFIG, IMAGE_BUILDER),
}


@settings(max_examples=200, deadline=None)
@given(base=st.sampled_from(list(ROTATABLE)), username=st.text(), password=st.text())
def test_random_rotations_change_exactly_the_values(
    base: str, username: str, password: str
) -> None:
    text, host = ROTATABLE[base]
    updates = {host: {"username": username, "password": password}}
    fast = _rotate_in_place(text, updates)
    assert fast is not None
    expected = tomllib.loads(text)
    plugin = _plugin_of(expected)
    expected["plugins"][plugin]["registry"]["configs"][host]["auth"] = updates[host]
    assert tomllib.loads(fast) == expected == tomllib.loads(slow_render(text, updates))
    assert len(changed_lines(text, fast)) <= 2


# reading a text once per pass


def test_entries_hand_out_copies_of_what_they_remember() -> None:
    text = MINIMAL + toml(auth_header("r"), 'username = "u"', 'mirrors = ["a"]')
    containerd = ContainerdFormat(memo=ParsedTexts())
    containerd.entries(text)["r"]["mirrors"].append("b")
    containerd.entries(text)["r"]["username"] = "changed"
    assert containerd.entries(text) == {"r": {"username": "u", "mirrors": ["a"]}}


@settings(max_examples=100, deadline=None)
@given(
    base=st.sampled_from(list(ROUND_TRIP_FILES)),
    steps=st.lists(updates_strategy, min_size=1, max_size=6),
)
def test_one_instance_over_many_passes_renders_like_fresh_ones(
    base: str, steps: list[dict[str, Entry | None]]
) -> None:
    shared, text = ContainerdFormat(memo=ParsedTexts()), ROUND_TRIP_FILES[base]
    for updates in steps:
        assert shared.entries(text) == ContainerdFormat().entries(text)
        rendered = shared.render(text, updates)
        assert rendered == ContainerdFormat().render(text, updates)
        text = rendered
    assert shared.entries(text) == ContainerdFormat().entries(text)


def test_the_memo_holds_the_last_two_texts_read_or_rendered() -> None:
    memo = ParsedTexts()
    containerd = ContainerdFormat(memo=memo)
    rendered = containerd.render(MINIMAL, {"r": NEW})
    assert memo.get(rendered) == tomllib.loads(rendered)  # the next pass reads it
    assert memo.get(MINIMAL) == {"version": 2}
    containerd.entries(V2_CONFIG)
    assert memo.get(MINIMAL) is None and memo.get(V2_CONFIG) is not None


def test_unreadable_text_is_refused_every_time() -> None:
    containerd = ContainerdFormat(memo=ParsedTexts())
    for _ in range(2):
        with pytest.raises(FormatError, match="not valid TOML"):
            containerd.entries("version = 2\n[a]\nb = SECRET\n")


# What the editor relies on in tomlkit beyond its documented API. A tomlkit release that
# changes one of these fails here first, by name, instead of somewhere in the render tables.


def test_tomlkit_leaves_a_null_in_the_body_slot_of_a_removed_item() -> None:
    # The editor puts its placeholder for a removed table or field into that slot.
    document = tomlkit.parse('[a]\nx = 1\ny = 2\n[b]\n')
    table = document["a"]
    assert isinstance(table, tomlkit.items.Table)
    table.remove("x")
    assert isinstance(table.value.body[0][1], tomlkit.items.Null)
    table.value.body[0] = (None, tomlkit.items.Whitespace("\x000\x00\n"))
    assert document.as_string() == "[a]\n\x000\x00\ny = 2\n[b]\n"


def test_tomlkit_renders_trivia_trail_right_after_a_line() -> None:
    # New fields are spliced in after the trail of the last field, or of the table header.
    document = tomlkit.parse('[a] # header\nx.y = 1 # field\n[b]\n')
    table = document["a"]
    assert isinstance(table, tomlkit.items.Table)
    table.trivia.trail += "<after header>\n"
    dotted = table.value.body[0][1]
    assert isinstance(dotted, tomlkit.items.Table)
    dotted.value.body[0][1].trivia.trail += "<after field>\n"
    assert document.as_string() == (
        "[a] # header\n<after header>\nx.y = 1 # field\n<after field>\n[b]\n"
    )


PARENTS_AFTER_CHILDREN = (
    "version = 2\n[plugins]\n"
    f'  [{CRI}.registry.configs."reg.example"]\n'
    f"  [{CRI}.registry.configs]\n"
    f"  [{CRI}.registry]\n"
)


def test_a_config_toml_with_parents_after_children_is_edited_not_a_traceback() -> None:
    """Found by: node-file fuzz (RELIABILITY.md, "Bugs found")."""
    # tomlkit before 0.15.3 raised AttributeError on this valid TOML; 0.15.3 loads it.
    file_format = ContainerdFormat()
    entry = {"username": "u", "password": "p"}
    edited = file_format.render(PARENTS_AFTER_CHILDREN, {"reg.example": entry})
    assert file_format.entries(edited) == {"reg.example": entry}
    assert file_format.entries(file_format.render(edited, {"reg.example": None})) == {}


def test_a_config_toml_nested_too_deeply_is_refused() -> None:
    """Found by: node-file fuzz (RELIABILITY.md, "Bugs found")."""
    file_format = ContainerdFormat()
    with pytest.raises(FormatError, match="refusing"):
        file_format.render(
            "version = 2\na = " + "[" * 5000 + "]" * 5000 + "\n",
            {"reg.example": {"username": "u", "password": "p"}},
        )
