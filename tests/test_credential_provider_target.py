"""`--targets credential-provider` through the command line: the files it keeps on a node,
what `check` proves by running the plugin, and what a rotation changes (and restarts: nothing)."""

import json
import os
import stat
from pathlib import Path

import pytest
from support.kubelet_credential_provider import (
    NODE_IMAGE_CONFIG,
    config_dir_errors,
    config_errors,
    request,
    response_errors,
    run_plugin,
)

from node_agent.cli import main
from node_agent.targets.credential_provider import PLUGIN_NAME, PLUGIN_SCRIPT, RESPONSE_NAME

PASSWORD = "Pa55-w0rd-never-printed"
BIN_DIR = "etc/kubernetes/image-credential-provider"
CONFIG = f"{BIN_DIR}/config.yaml"
NODE_FILES = Path(__file__).parents[1] / "daemonset/credential-provider/node-files"


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A node with the kubelet's plugin directory and nothing of the agent's yet."""
    root = tmp_path / "host"
    (root / BIN_DIR).mkdir(parents=True)
    return root


def secret(tmp_path: Path, password: str = PASSWORD, **more: str) -> Path:
    auths = {"r.example.com": {"username": "puller", "password": password}}
    auths.update({host: {"username": "u", "password": pw} for host, pw in more.items()})
    path = tmp_path / f"secret-{password}.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def run(command: str, host: Path, secret_path: Path, *extra: str) -> int:
    flags = ["--secret-file", str(secret_path), "--host-root", str(host), "--reload", "none"]
    return main([command, *flags, "--targets", "credential-provider", *extra], environ={})


def plugin_answer(host: Path) -> dict[str, object]:
    result = run_plugin(host / BIN_DIR / PLUGIN_NAME, request("r.example.com/team/app:1"))
    assert result.returncode == 0, result.stderr
    assert response_errors(result.stdout, api_version="credentialprovider.kubelet.k8s.io/v1") == []
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_reconcile_installs_the_plugin_its_response_and_the_kubelet_config(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("reconcile", host, secret(tmp_path)) == 0
    plugin, response = host / BIN_DIR / PLUGIN_NAME, host / BIN_DIR / RESPONSE_NAME
    assert plugin.read_text() == PLUGIN_SCRIPT
    assert stat.S_IMODE(plugin.stat().st_mode) == 0o755
    assert stat.S_IMODE(response.stat().st_mode) == 0o600
    assert config_errors((host / CONFIG).read_text(), bin_dir=host / BIN_DIR) == []
    assert plugin_answer(host)["auth"] == {
        "r.example.com": {"username": "puller", "password": PASSWORD}
    }
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "credential-provider-response: add r.example.com",
        f"credential-provider-plugin: add {PLUGIN_NAME}",
        f"credential-provider-config: add {PLUGIN_NAME}",
    ]
    assert "restart the kubelet" in err
    assert PASSWORD not in out + err


def test_a_rotation_reaches_the_next_answer_and_needs_no_kubelet_restart(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("reconcile", host, secret(tmp_path))
    config_before = (host / CONFIG).read_bytes()
    capsys.readouterr()
    assert run("reconcile", host, secret(tmp_path, "rotated-pw")) == 0
    answer = json.dumps(plugin_answer(host))
    assert "rotated-pw" in answer and PASSWORD not in answer
    assert (host / CONFIG).read_bytes() == config_before
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "credential-provider-response: update r.example.com",
        "credential-provider-plugin: in sync",
        "credential-provider-config: in sync",
    ]
    assert "restart the kubelet" not in err


def test_a_new_registry_changes_the_config_and_says_the_kubelet_must_restart(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("reconcile", host, secret(tmp_path))
    capsys.readouterr()
    assert run("reconcile", host, secret(tmp_path, **{"new.example": "n"})) == 0
    assert "- \"new.example\"" in (host / CONFIG).read_text()
    assert "restart the kubelet" in capsys.readouterr().err


def test_an_existing_provider_config_keeps_the_other_provider_byte_for_byte(
    host: Path, tmp_path: Path
) -> None:
    (host / CONFIG).write_text(NODE_IMAGE_CONFIG)
    (host / CONFIG).chmod(0o644)
    assert run("reconcile", host, secret(tmp_path)) == 0
    merged = (host / CONFIG).read_text()
    assert merged.startswith(NODE_IMAGE_CONFIG)
    assert config_errors(merged) == []
    assert stat.S_IMODE((host / CONFIG).stat().st_mode) == 0o600  # no credential, but ours


def test_check_runs_the_plugin_as_the_kubelet_would(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("reconcile", host, secret(tmp_path))
    capsys.readouterr()
    assert run("check", host, secret(tmp_path)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "credential-provider-plugin: answers as the kubelet asks (1 registries)",
        "in sync",
    ]


def test_check_finds_a_plugin_answering_other_credentials(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("reconcile", host, secret(tmp_path))
    capsys.readouterr()
    assert run("check", host, secret(tmp_path, "rotated-pw")) == 3
    out = capsys.readouterr().out
    assert "out of sync: credential-provider-response: update r.example.com" in out
    assert (
        "out of sync: credential-provider-plugin: asked for r.example.com/node-agent/check:latest:"
        " r.example.com: not the credentials of the sources"
    ) in out
    assert "rotated-pw" not in out and PASSWORD not in out


def test_check_finds_a_plugin_that_fails(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("reconcile", host, secret(tmp_path))
    (host / BIN_DIR / RESPONSE_NAME).write_text("{}")
    capsys.readouterr()
    assert run("check", host, secret(tmp_path)) == 3
    out = capsys.readouterr().out
    asked = "credential-provider-plugin: asked for r.example.com/node-agent/check:latest"
    assert f"{asked}: exit 1:" in out
    assert "is not a complete response" in out


def test_a_dry_run_writes_nothing_and_shows_no_credential(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("reconcile", host, secret(tmp_path), "--dry-run") == 0
    assert sorted(p.name for p in host.rglob("*") if p.is_file()) == []
    out = capsys.readouterr().out
    assert "would credential-provider-response: add r.example.com" in out
    assert PASSWORD not in out


def test_without_the_kubelet_plugin_directory_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = tmp_path / "bare"
    (host / "etc/kubernetes").mkdir(parents=True)
    assert run("reconcile", host, secret(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "image-credential-provider: directory does not exist" in err
    assert "(wrong path or --host-root?)" in err
    assert [p for p in host.rglob("*") if p.is_file()] == []


def test_another_executable_under_the_plugin_name_is_left_alone(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    theirs = host / BIN_DIR / PLUGIN_NAME
    theirs.write_text("#!/bin/sh\necho '{}'\n")
    assert run("reconcile", host, secret(tmp_path)) == 1
    assert "not a node-agent-credential-provider written by node-agent" in capsys.readouterr().err
    assert theirs.read_text() == "#!/bin/sh\necho '{}'\n"
    assert not (host / BIN_DIR / RESPONSE_NAME).exists()


def test_the_cache_duration_flag_is_checked_and_reaches_config_and_response(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = "--credential-provider-cache-duration"
    assert run("reconcile", host, secret(tmp_path), flag, "1d") == 2
    assert flag in capsys.readouterr().err
    assert run("reconcile", host, secret(tmp_path), flag, "30s") == 0
    assert plugin_answer(host)["cacheDuration"] == "30s"
    assert 'defaultCacheDuration: "30s"' in (host / CONFIG).read_text()


def test_the_default_targets_leave_the_credential_provider_alone(
    tmp_path: Path, host: Path
) -> None:
    (host / "etc/containerd").mkdir(parents=True)
    (host / "var/lib/kubelet").mkdir(parents=True)
    flags = ["--secret-file", str(secret(tmp_path)), "--host-root", str(host), "--reload", "none"]
    assert main(["reconcile", *flags], environ={}) == 0
    assert os.listdir(host / BIN_DIR) == []


def test_a_config_directory_gets_a_file_of_the_agent_own_beside_the_others(
    host: Path, tmp_path: Path
) -> None:
    directory = host / "etc/kubernetes/credential-providers.d"
    directory.mkdir(parents=True)
    (directory / "10-ecr.yaml").write_text(NODE_IMAGE_CONFIG)
    flag = ["--credential-provider-config", "/etc/kubernetes/credential-providers.d"]
    assert run("reconcile", host, secret(tmp_path), *flag) == 0
    assert sorted(p.name for p in directory.iterdir()) == [
        "10-ecr.yaml",
        f"{PLUGIN_NAME}.yaml",
    ]
    assert (directory / "10-ecr.yaml").read_text() == NODE_IMAGE_CONFIG
    assert config_dir_errors(directory) == []


def test_in_a_config_directory_the_file_that_names_the_agent_provider_is_kept(
    host: Path, tmp_path: Path
) -> None:
    """The node image put the agent's config.yaml into the kubelet's config directory: the
    agent keeps its entry there, never a second one the kubelet would refuse as a duplicate."""
    directory = host / "etc/kubernetes/credential-providers.d"
    directory.mkdir(parents=True)
    (directory / "10-ecr.yaml").write_text(NODE_IMAGE_CONFIG)
    (directory / "50-node-agent.yaml").write_text(
        (NODE_FILES / "config.yaml").read_text().replace('"*.*.*.*.*.*"', '"old.example"')
    )
    flag = ["--credential-provider-config", "/etc/kubernetes/credential-providers.d"]
    assert run("reconcile", host, secret(tmp_path), *flag) == 0
    assert sorted(p.name for p in directory.iterdir()) == ["10-ecr.yaml", "50-node-agent.yaml"]
    assert '"r.example.com"' in (directory / "50-node-agent.yaml").read_text()
    assert config_dir_errors(directory) == []
