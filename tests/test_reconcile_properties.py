"""Property: whatever the agent does not own survives any sequence of reconciles, and once
every registry leaves the Secret the node files are back to what they were."""

import json
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.credentials import Credentials, RegistryAuth
from node_agent.ownership import StateStore
from node_agent.reconcile import NodeFile, Reconciler
from node_agent.targets.containerd import ContainerdFormat
from node_agent.targets.kubelet import KubeletFormat

CRI = "io.containerd.grpc.v1.cri"
# Registries the Secret may name; the first two also have foreign entries on the node.
POOL = ["shared-a.example", "shared-b.example:5000", "new-c.example", "new-d.example"]
FOREIGN_HOSTS = ["shared-a.example", "shared-b.example:5000", "only-theirs.example"]
CONTAINERD_CONFIG = (
    "# foreign config\nversion = 2\n\n"
    f'[plugins."{CRI}"]\n  sandbox_image = "pause:3.6"\n\n'
    f'  [plugins."{CRI}".registry]\n    config_path = ""\n\n'
    + "".join(
        f'    [plugins."{CRI}".registry.configs."{host}".auth]\n'
        f'      username = "foreign-{i}"\n      password = "foreign-pw-{i}"\n\n'
        for i, host in enumerate(FOREIGN_HOSTS)
    )
    + f'  [plugins."{CRI}".containerd]\n    snapshotter = "overlayfs"\n'
)
KUBELET_CONFIG = json.dumps(
    {"auths": {host: {"auth": f"Zm9yZWlnbjp7aX0{i}"} for i, host in enumerate(FOREIGN_HOSTS)}},
    indent=2,
)

passwords = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=12
)
credential_sets = st.dictionaries(
    st.sampled_from(POOL),
    st.builds(RegistryAuth, username=st.sampled_from(["u1", "u2"]), password=passwords),
    max_size=len(POOL),
)


def toml_auths(path: Path) -> dict[str, Any]:
    configs = tomllib.loads(path.read_text())["plugins"][CRI]["registry"].get("configs", {})
    return {host: table["auth"] for host, table in configs.items() if "auth" in table}


def json_auths(path: Path) -> dict[str, Any]:
    auths: dict[str, Any] = json.loads(path.read_text())["auths"]
    return auths


ORIGINAL_TOML = tomllib.loads(CONTAINERD_CONFIG)
ORIGINAL_TOML_AUTHS = {
    h: t["auth"] for h, t in ORIGINAL_TOML["plugins"][CRI]["registry"]["configs"].items()
}
ORIGINAL_JSON_AUTHS = json.loads(KUBELET_CONFIG)["auths"]


def check_invariants(root: Path, credentials: Credentials) -> None:
    containerd, kubelet = toml_auths(root / "config.toml"), json_auths(root / "config.json")
    for host, auth in ORIGINAL_TOML_AUTHS.items():
        if host not in credentials:
            assert containerd[host] == auth
    for host, auth in ORIGINAL_JSON_AUTHS.items():
        if host not in credentials:
            assert kubelet[host] == auth
    for registry, auth in credentials.items():
        assert containerd[registry] == {"username": auth.username, "password": auth.password}
        assert kubelet[registry] == {"auth": auth.basic_auth_token()}
    assert set(containerd) == set(ORIGINAL_TOML_AUTHS) | set(credentials)
    data = tomllib.loads((root / "config.toml").read_text())
    assert data["plugins"][CRI]["containerd"] == ORIGINAL_TOML["plugins"][CRI]["containerd"]
    assert data["plugins"][CRI]["sandbox_image"] == "pause:3.6"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(credential_sets, min_size=1, max_size=6))
def test_foreign_entries_survive_any_sequence_and_removal_restores_the_files(
    sequence: list[Credentials],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "config.toml").write_text(CONTAINERD_CONFIG)
        (root / "config.json").write_text(KUBELET_CONFIG)
        reconciler = Reconciler(
            [
                NodeFile(ContainerdFormat(), root / "config.toml", restarts_containerd=True),
                NodeFile(KubeletFormat(), root / "config.json"),
            ],
            StateStore(root / "state"),
        )
        for credentials in sequence:
            reconciler.reconcile(credentials)
            check_invariants(root, credentials)
            assert reconciler.inspect(credentials).in_sync
        reconciler.reconcile({})
        assert (root / "config.toml").read_text() == CONTAINERD_CONFIG
        assert json_auths(root / "config.json") == ORIGINAL_JSON_AUTHS
