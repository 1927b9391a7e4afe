"""The command line contract: flags, env vars, exit codes, output, and that nothing leaks."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.dockerconfig import docker_config

from node_agent.cli import main, parse_duration

PASSWORD = "Pa55-w0rd-never-printed"
CRI = "io.containerd.grpc.v1.cri"


def secret_file(tmp_path: Path, auths: dict[str, object]) -> Path:
    path = tmp_path / "secret.json"
    path.write_bytes(docker_config(auths))
    return path


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A node tree: config.toml with a foreign host, kubelet config.json with a foreign entry."""
    root = tmp_path / "host"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "var/lib/kubelet").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        f'version = 2\n\n[plugins."{CRI}".registry.configs."other.example".auth]\n'
        '  username = "them"\n  password = "theirs"\n'
    )
    (root / "var/lib/kubelet/config.json").write_text('{"auths": {"quay.io": {"auth": "cTpx"}}}\n')
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run(*args: str, env: dict[str, str] | None = None) -> int:
    return main(list(args), environ=env or {})


def node_flags(host: Path, secret: Path) -> list[str]:
    return ["--secret-file", str(secret), "--host-root", str(host), "--reload", "none"]


def test_reconcile_applies_and_exits_0(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"username": "u", "password": PASSWORD}})
    assert run("reconcile", *node_flags(host, secret)) == 0
    assert "reg.example" in (host / "etc/containerd/config.toml").read_text()
    assert "reg.example" in (host / "var/lib/kubelet/config.json").read_text()
    assert (host / "var/lib/node-agent/owned.json").exists()
    out, err = capsys.readouterr()
    assert "containerd: add reg.example" in out
    assert PASSWORD not in out + err


def test_reconcile_again_is_a_no_op(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"username": "u", "password": PASSWORD}})
    run("reconcile", *node_flags(host, secret))
    before = {p: p.stat().st_mtime_ns for p in host.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run("reconcile", *node_flags(host, secret)) == 0
    assert {p: p.stat().st_mtime_ns for p in host.rglob("*") if p.is_file()} == before
    assert capsys.readouterr().out == "containerd: in sync\nkubelet: in sync\n"


BAD_SECRETS = [
    ("not json", "{oops", "document"),
    ("bad base64", '{"auths": {"r.example": {"auth": "***"}}}', "auth"),
    ("wrong type", '{"kind": "Secret", "type": "Opaque"}', "type"),
]


@pytest.mark.parametrize(("case", "content", "field"), BAD_SECRETS, ids=[c[0] for c in BAD_SECRETS])
def test_bad_secret_exits_1_with_one_line_and_changes_nothing(
    case: str,
    content: str,
    field: str,
    host: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = tmp_path / "bad.json"
    secret.write_text(content)
    before = snapshot(host)
    assert run("reconcile", *node_flags(host, secret)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(secret) in err and field in err
    assert snapshot(host) == before


def test_missing_secret_file_exits_1(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("reconcile", *node_flags(host, tmp_path / "absent.json")) == 1
    assert "absent.json: path: no such file" in capsys.readouterr().err


def test_unparseable_containerd_config_exits_1_and_changes_nothing(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (host / "etc/containerd/config.toml").write_text("version = 2\n[[[\n")
    secret = secret_file(tmp_path, {"reg.example": {"username": "u", "password": PASSWORD}})
    before = snapshot(host)
    assert run("reconcile", *node_flags(host, secret)) == 1
    assert "config.toml" in capsys.readouterr().err
    assert snapshot(host) == before


def test_dry_run_prints_a_redacted_diff_and_writes_nothing(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"username": "u", "password": PASSWORD}})
    before = snapshot(host)
    assert run("reconcile", "--dry-run", *node_flags(host, secret)) == 0
    out = capsys.readouterr().out
    assert "would containerd: add reg.example" in out
    assert '+  password = "***"' in out or '+password = "***"' in out.replace(" ", "")
    assert '"auth": "***"' in out
    assert PASSWORD not in out
    assert base64.b64encode(f"u:{PASSWORD}".encode()).decode() not in out
    assert "theirs" not in out  # foreign credentials are redacted too
    assert snapshot(host) == before


def test_check_exits_3_naming_what_differs_then_0_once_applied(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"username": "u", "password": PASSWORD}})
    assert run("check", *node_flags(host, secret)) == 3
    out = capsys.readouterr().out
    assert "out of sync: containerd: add reg.example" in out
    assert "out of sync: kubelet: add reg.example" in out
    run("reconcile", *node_flags(host, secret))
    capsys.readouterr()
    assert run("check", *node_flags(host, secret)) == 0
    assert capsys.readouterr().out == "in sync\n"


def test_every_flag_can_come_from_the_environment(host: Path, tmp_path: Path) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"username": "u", "password": PASSWORD}})
    env = {
        "NODE_AGENT_SECRET_FILE": str(secret),
        "NODE_AGENT_HOST_ROOT": str(host),
        "NODE_AGENT_RELOAD": "none",
        "NODE_AGENT_TARGETS": "kubelet",
    }
    assert run("reconcile", env=env) == 0
    assert "reg.example" in (host / "var/lib/kubelet/config.json").read_text()
    assert "reg.example" not in (host / "etc/containerd/config.toml").read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["reconcile", "--targets", "docker"],
        ["reconcile", "--secret-file", "s", "--reload", "command"],
        ["reconcile", "--secret-file", "s", "--reload-command", "true"],
        ["reconcile", "--secret-file", "s", "--reload-timeout", "soon"],
        ["reconcile", "--secret-file", "s", "--containerd-config-version", "1"],
        ["reconcile"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run(*args) == 2


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--reload", "command"], "--reload command needs --reload-command"),
        (["--reload", "command", "--reload-command", "   "], "--reload command needs"),
        (
            ["--reload", "command", "--reload-command", "systemctl 'restart"],
            "--reload-command cannot be parsed: No closing quotation",
        ),
        (["--reload", "none", "--reload-command", "x"], "only used with --reload command, not"),
        (["--reload-command", "x"], "only used with --reload command, not systemd"),
        (["--reload", "reboot"], "invalid choice: 'reboot'"),
    ],
)
def test_restart_flags_that_do_not_fit_are_usage_errors_naming_the_flag(
    flags: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("reconcile", "--secret-file", "s", *flags) == 2
    assert problem in capsys.readouterr().err


def test_json_logs_are_one_object_per_line(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"identitytoken": PASSWORD}})
    assert run("reconcile", "--log-format", "json", *node_flags(host, secret)) == 0
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    assert any("kubelet ignores identitytoken" in r["message"] for r in records)
    assert all(PASSWORD not in line for line in lines)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("200ms", 0.2), ("5m", 300.0), ("2", 2.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_demo_runs_on_the_embedded_sample_without_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("demo", "--dir", str(tmp_path / "demo")) == 0
    out = capsys.readouterr().out
    assert "would containerd: add registry-1.docker.io" in out
    assert "in sync" in out
    assert "demo-registry-password" not in out
    assert "***" in out


@pytest.mark.skipif(shutil.which("node-agent") is None, reason="package not installed")
def test_console_script_is_installed() -> None:
    result = subprocess.run(["node-agent", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "reconcile" in result.stdout
    module = subprocess.run(
        [sys.executable, "-m", "node_agent", "check", "--help"], capture_output=True, check=False
    )
    assert module.returncode == 0


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["real run", "dry run"])
def test_a_host_root_that_does_not_exist_fails_alike_in_a_dry_run_and_creates_nothing(
    tmp_path: Path, dry_run: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"username": "u", "password": PASSWORD}})
    host = tmp_path / "no-such-dir"
    assert run("reconcile", *node_flags(host, secret), *dry_run) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "directory does not exist" in err
    assert not host.exists()


@pytest.mark.parametrize("command", ["reconcile", "check", "run"])
def test_a_host_root_that_is_a_file_is_a_usage_error_saying_so(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"username": "u", "password": PASSWORD}})
    host = tmp_path / "host.tar"
    host.write_text("not a directory")
    assert run(command, *node_flags(host, secret)) == 2
    err = capsys.readouterr().err
    assert f"--host-root {host} is a file, not a directory" in err


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert run("--version") == 0
    assert capsys.readouterr().out == f"node-agent {version('node-agent')}\n"


@pytest.mark.parametrize("command", ["reconcile", "check", "run"])
def test_help_shows_every_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(command, "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: systemd)" in text and "(default: /)" in text
    assert "(default: containerd,kubelet)" in text and "(default: 30s)" in text
    assert "--secret-file" in text and "need one, or a --fallback" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    if command == "run":
        assert "--no-events record no Events" in text


def test_under_json_logs_the_fatal_error_is_a_json_record_too(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secret_file(tmp_path, {"reg.example": {"auth": "not base64!"}})
    assert run("reconcile", "--log-format", "json", *node_flags(host, secret)) == 1
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]  # every line, the last one too
    assert records[-1]["level"] == "error" and records[-1]["logger"] == "node_agent"
    assert 'auths["reg.example"].auth: not valid base64' in records[-1]["message"]


# The argument groups of `run --help`, in order, and flags each must hold.
RUN_GROUPS = {
    "sources": {"--secret-file", "--fallback-secret-file", "--secret", "--fallback-secret"},
    "node files": {
        "--containerd-config",
        "--kubelet-config",
        "--targets",
        "--host-root",
        "--credential-provider-bin-dir",
        "--credential-provider-config",
        "--credential-provider-cache-duration",
        "--credential-provider-match-images",
    },
    "restarts": {"--reload", "--reload-command", "--reload-timeout", "--min-reload-interval"},
    "restart slots": {"--restart-concurrency", "--restart-lease-ttl", "--restart-max-wait"},
    "API": {"--kubeconfig", "--node-name", "--events", "--no-events"},
    "stuck pods": {"--recover-stuck-pods", "--recover-stuck-pods-rate"},
    "observability": {"--log-format", "--log-level", "--metrics-address"},
}


def help_entries(text: str) -> dict[str, dict[str, str]]:
    """`--help` output as group title → flag → its help text (without env and default)."""
    groups: dict[str, dict[str, str]] = {}
    flag = ""
    for line in text.splitlines():
        if re.fullmatch(r"[\w ]+:", line):
            entries = groups.setdefault(line[:-1], {})
        elif match := re.match(r"  (-[-\w]+)[^ ]*(?: \S+)*?(?:  +(?P<help>.*))?$", line):
            flag = match[1]
            entries[flag] = match["help"] or ""
        elif line.startswith("    ") and flag:
            entries[flag] += " " + line.strip()
    for entries in groups.values():
        for name, help_text in entries.items():
            bare = re.sub(r"\[env \w+\]|\(default: [^)]*\)", "", help_text)
            entries[name] = " ".join(bare.split())
    return groups


@pytest.mark.parametrize("command", ["reconcile", "check", "run"])
def test_every_flag_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(command, "--help") == 0
    for group, entries in help_entries(capsys.readouterr().out).items():
        for flag, help_text in entries.items():
            assert help_text, f"{command} --help: {flag} ({group}) has no help"


def test_run_help_groups_its_flags_by_what_they_are_about(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("run", "--help") == 0
    groups = help_entries(capsys.readouterr().out)
    assert [title for title in groups if title not in ("options", "usage")] == list(RUN_GROUPS)
    for title, flags in RUN_GROUPS.items():
        assert flags <= groups[title].keys(), f"{title}: {sorted(flags - groups[title].keys())}"
    assert set(groups["options"]) == {"-h"}, "a flag outside every group"


def test_reconcile_help_shows_only_the_groups_it_has_flags_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("reconcile", "--help") == 0
    groups = help_entries(capsys.readouterr().out)
    assert [t for t in groups if t != "options"] == [
        "sources",
        "node files",
        "restarts",
        "observability",
    ]
    assert "--dry-run" in groups["node files"]


def test_an_opaque_secret_manifest_with_a_dockerconfigjson_key_is_applied_with_a_warning(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inner = json.dumps({"auths": {"reg.example": {"username": "u", "password": PASSWORD}}})
    manifest = tmp_path / "secret.json"
    manifest.write_text(
        json.dumps(
            {"kind": "Secret", "type": "Opaque", "stringData": {".dockerconfigjson": inner}}
        )
    )
    flags = ["--secret-file", str(manifest), "--host-root", str(host), "--reload", "none"]
    assert run("reconcile", *flags) == 0
    assert "reg.example" in (host / "var/lib/kubelet/config.json").read_text()
    err = capsys.readouterr().err
    assert f"{manifest}: type: Opaque, read as kubernetes.io/dockerconfigjson" in err
    assert "kubectl create secret docker-registry" in err and PASSWORD not in err
