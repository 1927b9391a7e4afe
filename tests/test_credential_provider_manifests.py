"""daemonset/credential-provider: the component that turns the target on, and the node files
a node image puts in place before the kubelet first starts with the provider flags."""

import stat
from pathlib import Path, PurePosixPath

from support.kubelet_credential_provider import config_errors
from test_manifests import (
    BASE,
    daemonset,
    downward_api_environment,
    rendered_daemonset,
)

from node_agent.cli import build_parser, daemon_settings_from, main
from node_agent.targets.credential_provider import (
    PLUGIN_NAME,
    PLUGIN_SCRIPT,
    RESPONSE_NAME,
    ProviderConfigFormat,
    ResponseFormat,
)

COMPONENT = BASE / "credential-provider"
NODE_FILES = COMPONENT / "node-files"
BIN_DIR = PurePosixPath("/etc/kubernetes/image-credential-provider")


def test_the_component_adds_the_target_and_one_mount_and_keeps_the_rest(tmp_path: Path) -> None:
    changed = rendered_daemonset(tmp_path, COMPONENT)
    container = changed["spec"]["template"]["spec"]["containers"][0]
    environ = downward_api_environment(container, namespace=changed["metadata"]["namespace"])
    settings = daemon_settings_from(build_parser(environ).parse_args(container["args"])).node
    assert settings.targets == ("containerd", "kubelet", "credential-provider")
    assert settings.credential_provider_match_images == "all"
    assert PurePosixPath(settings.credential_provider_bin_dir) == BIN_DIR
    assert PurePosixPath(settings.credential_provider_config).parent == BIN_DIR
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in changed["spec"]["template"]["spec"]["volumes"]}
    mount = mounts[str(settings.on_host(settings.credential_provider_bin_dir))]
    assert not mount.get("readOnly", False)
    assert volumes[mount["name"]]["hostPath"] == {"path": str(BIN_DIR), "type": "DirectoryOrCreate"}
    base_container = daemonset()["spec"]["template"]["spec"]["containers"][0]
    assert set(mounts) - {m["mountPath"] for m in base_container["volumeMounts"]} == {
        mount["mountPath"]
    }


def test_the_node_files_are_what_the_agent_writes_and_the_kubelet_starts_with() -> None:
    plugin = NODE_FILES / PLUGIN_NAME
    assert plugin.read_text() == PLUGIN_SCRIPT
    assert stat.S_IMODE(plugin.stat().st_mode) & 0o111  # executable in the repository
    config = ProviderConfigFormat(match_all=True)
    assert (NODE_FILES / "config.yaml").read_text() == config.render(
        None, config.desired_entries({}, {}).entries
    )
    assert config_errors((NODE_FILES / "config.yaml").read_text(), bin_dir=NODE_FILES) == []
    assert (NODE_FILES / RESPONSE_NAME).read_text() == ResponseFormat().render(None, {})


def test_on_a_node_provisioned_with_the_node_files_the_agent_writes_only_the_response(
    tmp_path: Path,
) -> None:
    host = tmp_path / "host"
    bin_dir = host / str(BIN_DIR).lstrip("/")
    bin_dir.mkdir(parents=True)
    for source in NODE_FILES.iterdir():
        (bin_dir / source.name).write_bytes(source.read_bytes())
        (bin_dir / source.name).chmod(0o755 if source.name == PLUGIN_NAME else 0o600)
    before = {name: (bin_dir / name).read_bytes() for name in (PLUGIN_NAME, "config.yaml")}
    secret = tmp_path / "secret.json"
    secret.write_text('{"auths": {"r.example.com": {"username": "u", "password": "p"}}}')
    flags = ["--secret-file", str(secret), "--host-root", str(host), "--reload", "none"]
    extra = ["--targets", "credential-provider", "--credential-provider-match-images", "all"]
    assert main(["reconcile", *flags, *extra], environ={}) == 0
    assert {name: (bin_dir / name).read_bytes() for name in before} == before
    assert b'"r.example.com"' in (bin_dir / RESPONSE_NAME).read_bytes()
