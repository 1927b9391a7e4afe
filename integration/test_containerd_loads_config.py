"""Every config.toml the agent writes loads in the real containerd, not only in tomllib.

`containerd --config FILE config dump` parses the file with containerd's own TOML parser (the
one that runs at its next start) and prints the configuration it would run with. A file it
cannot load would leave the node without a runtime after the next restart. Each case runs
`node-agent reconcile` on containerd's default config (`containerd config default`), then
checks the dump: it loads, and its auth tables are exactly the ones the Secret asks for.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from integration.containerd import CONTAINERD_BINARY, CRI_PLUGIN, default_config_text
from node_agent.cli import main

_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))
from test_reconcile import NODE_IMAGE_HOST, TAKEOVER_SHAPES  # noqa: E402

ENTRY = {"username": "puller", "password": "pw"}
CONTAINERD_AUTH = {"username": "puller", "password": "pw"}

#: Registry keys of every shape a Secret may use → the host containerd is given (None: skipped).
KEY_SHAPES: dict[str, str | None] = {
    "reg.example.com": "reg.example.com",
    "reg.example.com:5000": "reg.example.com:5000",
    "https://Registry.Example.com:443/v2/": "registry.example.com:443",
    "127.0.0.1:5000": "127.0.0.1:5000",
    "10.0.0.7": "10.0.0.7",
    "xn--bcher-kva.example": "xn--bcher-kva.example",
    "localhost": "localhost",
    "my_registry.local": "my_registry.local",
    "https://index.docker.io/v1/": "registry-1.docker.io",
    "[::1]:5000": None,
    "[fd00::10]:443": None,
    "*.example.com": None,
}


def config_dump(config: Path) -> dict[str, Any]:
    """The configuration containerd would run with `config`; fails the test if it cannot
    load it."""
    result = subprocess.run(
        [CONTAINERD_BINARY, "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"containerd cannot load {config}: {result.stderr.strip()}"
    return tomllib.loads(result.stdout)


def dumped_auths(dump: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The auth tables containerd loaded, without the fields it fills in as empty."""
    configs = dump["plugins"][CRI_PLUGIN]["registry"]["configs"]
    return {
        host: {name: value for name, value in config["auth"].items() if value}
        for host, config in configs.items()
        if config.get("auth")
    }


def reconcile(host_root: Path, auths: dict[str, Any]) -> None:
    secret = host_root / "secret.json"
    secret.write_text(json.dumps({"auths": auths}))
    flags = ["--secret-file", str(secret), "--host-root", str(host_root), "--reload", "none"]
    assert main(["reconcile", *flags, "--targets", "containerd"], environ={}) == 0


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    (tmp_path / "etc/containerd").mkdir(parents=True)
    (tmp_path / "etc/containerd/config.toml").write_text(default_config_text())
    return tmp_path


def test_every_registry_key_shape_loads_in_containerd(host_root: Path) -> None:
    reconcile(host_root, dict.fromkeys(KEY_SHAPES, ENTRY))
    expected = {host: CONTAINERD_AUTH for host in KEY_SHAPES.values() if host is not None}
    assert dumped_auths(config_dump(host_root / "etc/containerd/config.toml")) == expected


@pytest.mark.parametrize("name", TAKEOVER_SHAPES)
def test_taking_over_and_giving_back_what_a_node_image_wrote_loads_in_containerd(
    host_root: Path, name: str
) -> None:
    config = host_root / "etc/containerd/config.toml"
    original = f"version = 2\n\n{TAKEOVER_SHAPES[name]}"
    config.write_text(original)
    before = dumped_auths(config_dump(config))
    reconcile(host_root, {NODE_IMAGE_HOST: ENTRY})
    assert dumped_auths(config_dump(config))[NODE_IMAGE_HOST] == CONTAINERD_AUTH
    reconcile(host_root, {})
    assert dumped_auths(config_dump(config)) == before


@pytest.mark.parametrize(
    "layout",
    [
        # A parent table's header after its child's, across another table.
        "version = 2\n"
        f'[plugins."{CRI_PLUGIN}"]\n'
        f'[plugins."{CRI_PLUGIN}".registry.configs."a.example".auth]\n'
        'username = "old"\n'
        f'[plugins."{CRI_PLUGIN}".registry]\n'
        '[plugins."io.containerd.internal.v1.opt"]\n',
        # An indented child table before its parent.
        "version = 2\n"
        f'  [plugins."{CRI_PLUGIN}".registry.configs."a.example".auth]\n'
        '  username = "old"\n'
        f'[plugins."{CRI_PLUGIN}".registry]\n'
        'config_path = ""\n',
    ],
    ids=["parent after child", "indented child before parent"],
)
def test_parent_tables_after_their_children_load_in_containerd_after_an_edit(
    host_root: Path, layout: str
) -> None:
    config = host_root / "etc/containerd/config.toml"
    config.write_text(layout)
    reconcile(host_root, {"a.example": ENTRY, "b.example": ENTRY})
    auths = dumped_auths(config_dump(config))
    assert auths == {"a.example": CONTAINERD_AUTH, "b.example": CONTAINERD_AUTH}
