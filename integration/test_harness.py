"""The harness itself works: the registry demands auth, containerd serves CRI, and containerd's
``configs."HOST".auth`` in config.toml decides whether a credential-less CRI pull succeeds.

These are the facts node-agent is built on; if one of them breaks, the reconcile tests would
fail for reasons that have nothing to do with the agent.
"""

from __future__ import annotations

import json
import subprocess
import tomllib

import pytest

from integration.containerd import CRI_PLUGIN, ContainerdNode
from integration.oci_image import MANIFEST_MEDIA_TYPE, PushedImage
from integration.processes import HarnessError
from integration.registry import AuthRegistry, basic_auth_header, http_request
from node_agent.cri import CriError

pytestmark = pytest.mark.integration


def append_registry_auth(node: ContainerdNode, host: str, username: str, password: str) -> None:
    """Add a ``configs."HOST".auth`` table to config.toml by hand (what node-agent automates)."""
    table = f'[plugins."{CRI_PLUGIN}".registry.configs."{host}".auth]'
    # JSON string literals are valid TOML basic strings for these ASCII values.
    lines = [table, f"  username = {json.dumps(username)}", f"  password = {json.dumps(password)}"]
    with node.config_path.open("a") as config:
        config.write("\n" + "\n".join(lines) + "\n")


def replace_registry_password(node: ContainerdNode, old_password: str, new_password: str) -> None:
    text = node.config_path.read_text()
    old_line = f"password = {json.dumps(old_password)}"
    assert text.count(old_line) == 1
    node.config_path.write_text(text.replace(old_line, f"password = {json.dumps(new_password)}"))


def pull_error(node: ContainerdNode, image: str) -> CriError:
    """Pull without credentials in the request and return the error it must raise."""
    with node.cri() as cri, pytest.raises(CriError) as raised:
        cri.pull_image(image)
    return raised.value


def assert_pull_succeeds(node: ContainerdNode, image: PushedImage) -> None:
    with node.cri() as cri:
        image_ref = cri.pull_image(image.reference)
        assert image_ref.startswith("sha256:")
        assert cri.image_present(image.reference)
        cri.remove_image(image.reference)
        assert not cri.image_present(image.reference)


def test_registry_demands_basic_auth(auth_registry: AuthRegistry) -> None:
    anonymous = http_request("GET", auth_registry.url("/v2/"))
    assert anonymous.status == 401
    assert anonymous.headers["www-authenticate"].startswith("Basic realm=")
    assert auth_registry.accepts(auth_registry.username, auth_registry.password)
    assert not auth_registry.accepts(auth_registry.username, "wrong")


def test_registry_serves_pushed_manifest_with_auth_only(
    auth_registry: AuthRegistry, pushed_image: PushedImage
) -> None:
    path = f"/v2/{pushed_image.repository}/manifests/{pushed_image.tag}"
    accept = {"Accept": MANIFEST_MEDIA_TYPE}
    assert http_request("GET", auth_registry.url(path), headers=accept).status == 401
    served = http_request(
        "GET", auth_registry.url(path), headers={**accept, **auth_registry.auth_headers()}
    )
    assert served.status == 200
    assert served.headers["docker-content-digest"] == pushed_image.manifest_digest
    assert json.loads(served.body)["layers"][0]["mediaType"].endswith("tar+gzip")


def test_password_rotation_invalidates_old_password(auth_registry: AuthRegistry) -> None:
    old_password = auth_registry.password
    auth_registry.rotate_password("second-pw")
    assert auth_registry.accepts(auth_registry.username, "second-pw")
    assert not auth_registry.accepts(auth_registry.username, old_password)
    reply = http_request(
        "GET", auth_registry.url("/v2/"), headers=basic_auth_header("tester", old_password)
    )
    assert reply.status == 401


def test_containerd_cri_answers_version(containerd_node: ContainerdNode) -> None:
    with containerd_node.cri() as cri:
        version = cri.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"


def test_containerd_config_is_isolated_from_the_machine(containerd_node: ContainerdNode) -> None:
    config = tomllib.loads(containerd_node.config_path.read_text())
    workdir = str(containerd_node.workdir)
    for path in (config["root"], config["state"], config["grpc"]["address"]):
        assert path.startswith(workdir + "/")
    registry = config["plugins"][CRI_PLUGIN]["registry"]
    assert registry["configs"] == {}
    assert registry["mirrors"] == {}


def test_graceful_restart_keeps_cri(containerd_node: ContainerdNode) -> None:
    old_pid = containerd_node.pid()
    seconds = containerd_node.restart()
    assert containerd_node.pid() not in (None, old_pid)
    assert seconds < 10


def test_restart_command_restarts_containerd(containerd_node: ContainerdNode) -> None:
    old_pid = containerd_node.pid()
    subprocess.run(containerd_node.restart_command, shell=True, check=True, timeout=30)
    containerd_node.wait_cri_ready()
    assert containerd_node.pid() not in (None, old_pid)


def test_broken_restart_leaves_containerd_dead_once(containerd_node: ContainerdNode) -> None:
    containerd_node.break_next_restart(exit_code=3)
    broken = subprocess.run(containerd_node.restart_command, shell=True, check=False, timeout=30)
    assert broken.returncode == 3
    assert not containerd_node.is_running()
    assert not containerd_node.cri_ready()
    subprocess.run(containerd_node.restart_command, shell=True, check=True, timeout=30)
    containerd_node.wait_cri_ready()


def test_cri_plugin_config_error_leaves_containerd_up_without_cri(
    containerd_node: ContainerdNode,
) -> None:
    # containerd 1.6 refuses registry.mirrors together with config_path: the CRI plugin fails
    # to load while containerd itself keeps serving its socket. Only a CRI check notices.
    mirror = f'[plugins."{CRI_PLUGIN}".registry.mirrors."example.invalid"]'
    text = containerd_node.config_path.read_text()
    broken = text.replace('config_path = ""', 'config_path = "/nonexistent/certs.d"', 1)
    broken += f'\n{mirror}\n  endpoint = ["http://127.0.0.1:9"]\n'
    containerd_node.config_path.write_text(broken)
    subprocess.run(containerd_node.restart_command, shell=True, check=True, timeout=30)
    assert containerd_node.is_running()
    assert not containerd_node.cri_ready()
    with pytest.raises(HarnessError, match="CRI not ready"):
        containerd_node.wait_cri_ready(timeout=0.3)


def test_stop_then_is_running_false(containerd_node: ContainerdNode) -> None:
    containerd_node.stop()
    assert not containerd_node.is_running()
    containerd_node.stop()  # idempotent


def test_pull_uses_config_toml_auth(
    containerd_node: ContainerdNode, auth_registry: AuthRegistry, pushed_image: PushedImage
) -> None:
    error = pull_error(containerd_node, pushed_image.reference)
    assert "401 Unauthorized" in error.details

    append_registry_auth(
        containerd_node, auth_registry.host, auth_registry.username, auth_registry.password
    )
    containerd_node.restart()
    assert_pull_succeeds(containerd_node, pushed_image)


def test_rotated_password_breaks_pull_until_config_updated(
    containerd_node: ContainerdNode, auth_registry: AuthRegistry, pushed_image: PushedImage
) -> None:
    old_password = auth_registry.password
    append_registry_auth(containerd_node, auth_registry.host, auth_registry.username, old_password)
    containerd_node.restart()
    assert_pull_succeeds(containerd_node, pushed_image)

    auth_registry.rotate_password("rotated-pw")
    assert "401 Unauthorized" in pull_error(containerd_node, pushed_image.reference).details

    replace_registry_password(containerd_node, old_password, "rotated-pw")
    containerd_node.restart()
    assert_pull_succeeds(containerd_node, pushed_image)
