"""Node paths stay inside `--host-root`: symlinks mean what they mean on the node.

The resolver on its own (a tree in tmp_path is the host root), then the commands: a link on
the node that would lead out of the host root in the agent's own view is followed inside it,
a link to nothing is refused with nothing created, and the state dir is never narrowed to
0700 through a link.
"""

import json
import os
import stat
from pathlib import Path

import pytest

from node_agent.cli import main
from node_agent.errors import WriteFailed
from node_agent.host_paths import resolve_in_root, resolved_target

CRI = "io.containerd.grpc.v1.cri"
ENTRY = {"username": "u", "password": "Pa55-host-root"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    (host / "etc/containerd").mkdir(parents=True)
    (host / "var/lib/kubelet").mkdir(parents=True)
    (host / "opt/cfg").mkdir(parents=True)
    return host


# --- the resolver -----------------------------------------------------------------------------


def test_a_plain_path_is_itself(root: Path) -> None:
    resolved = resolve_in_root(root, root / "etc/containerd/config.toml")
    assert (resolved.path, resolved.exists) == (root / "etc/containerd/config.toml", False)
    assert resolved.dangling_link is None  # a missing file, not a link to nothing


def test_an_absolute_link_starts_at_the_host_root(root: Path) -> None:
    (root / "opt/cfg/config.toml").write_text("version = 2\n")
    (root / "etc/containerd/config.toml").symlink_to("/opt/cfg/config.toml")
    resolved = resolve_in_root(root, root / "etc/containerd/config.toml")
    assert (resolved.path, resolved.exists) == (root / "opt/cfg/config.toml", True)


def test_dot_dot_never_climbs_above_the_host_root(root: Path) -> None:
    (root / "etc/containerd/config.toml").symlink_to("../../../../../../../opt/cfg/x.toml")
    resolved = resolve_in_root(root, root / "etc/containerd/config.toml")
    assert resolved.path == root / "opt/cfg/x.toml"


def test_linked_directories_on_the_way_are_followed_inside_the_root(root: Path) -> None:
    (root / "var/lib/kubelet").rmdir()
    (root / "var/lib/kubelet").symlink_to("/opt/cfg")
    resolved = resolve_in_root(root, root / "var/lib/kubelet/config.json")
    assert resolved.path == root / "opt/cfg/config.json"
    assert resolved.dangling_link is None  # the directory exists: a new file may be made


def test_a_link_to_nothing_is_named(root: Path) -> None:
    (root / "etc/containerd/config.toml").symlink_to("/opt/missing/config.toml")
    resolved = resolve_in_root(root, root / "etc/containerd/config.toml")
    assert resolved.dangling_link == "/etc/containerd/config.toml"
    with pytest.raises(WriteFailed, match="dangling symlink"):
        resolved_target(root, root / "etc/containerd/config.toml")


def test_a_loop_is_an_error(root: Path) -> None:
    (root / "etc/containerd/a").symlink_to("b")
    (root / "etc/containerd/b").symlink_to("/etc/containerd/a")
    with pytest.raises(WriteFailed, match="symlink loop"):
        resolve_in_root(root, root / "etc/containerd/a")


def test_a_path_outside_the_root_is_an_error(root: Path, tmp_path: Path) -> None:
    with pytest.raises(WriteFailed, match="not under the host root"):
        resolve_in_root(root, tmp_path / "elsewhere")


def test_with_the_real_root_a_link_resolves_as_the_kernel_does(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert resolve_in_root(Path("/"), tmp_path / "link").path == (tmp_path / "link").resolve()


# --- the commands -----------------------------------------------------------------------------


def reconcile(root: Path, tmp_path: Path, *extra: str) -> int:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"auths": {"reg.example": ENTRY}}))
    flags = ["--secret-file", str(secret), "--host-root", str(root), "--reload", "none"]
    return main(["reconcile", *flags, *extra], environ={})


def test_an_absolute_link_on_the_node_is_written_inside_the_host_root(
    root: Path, tmp_path: Path
) -> None:
    (root / "opt/cfg/config.toml").write_text("version = 2\n")
    (root / "etc/containerd/config.toml").symlink_to("/opt/cfg/config.toml")
    assert reconcile(root, tmp_path) == 0
    assert "reg.example" in (root / "opt/cfg/config.toml").read_text()
    assert (root / "etc/containerd/config.toml").is_symlink()


def test_a_link_to_the_agents_own_files_reaches_nothing_outside_the_host_root(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside/config.toml"
    outside.parent.mkdir()
    outside.write_text("version = 2\n")
    before = outside.stat()
    (root / "etc/containerd/config.toml").symlink_to(outside)  # absolute, in the agent's view
    assert reconcile(root, tmp_path) == 1
    assert outside.read_text() == "version = 2\n"
    assert outside.stat().st_mtime_ns == before.st_mtime_ns
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dangling symlink" in err


def test_a_link_climbing_with_dot_dot_stays_inside_the_host_root(
    root: Path, tmp_path: Path
) -> None:
    escape = "../" * 20 + "outside/config.json"
    (root / "var/lib/kubelet/config.json").symlink_to(escape)
    (root / "outside").mkdir()
    (root / "outside/config.json").write_text("{}")
    assert reconcile(root, tmp_path) == 0
    assert "reg.example" in json.loads((root / "outside/config.json").read_text())["auths"]
    assert not (tmp_path / "outside").exists()


def test_a_dangling_link_creates_nothing_anywhere(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / "var/lib/kubelet/config.json").symlink_to("/var/lib/image/config.json")
    assert reconcile(root, tmp_path) == 1
    assert not (root / "var/lib/image").exists()
    assert not list(root.rglob("config.json.*"))
    assert not (root / "var/lib/node-agent").exists()
    assert "dangling symlink (/var/lib/kubelet/config.json points to" in capsys.readouterr().err


def test_a_state_dir_linked_out_of_the_root_is_never_chmod_ed(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    (root / "var/lib/node-agent").symlink_to(elsewhere)  # absolute, in the agent's view
    assert reconcile(root, tmp_path) == 1
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755
    assert list(elsewhere.iterdir()) == []
    assert "dangling symlink" in capsys.readouterr().err


def test_a_state_dir_linked_inside_the_root_is_used_there(root: Path, tmp_path: Path) -> None:
    (root / "data/agent-state").mkdir(parents=True, mode=0o755)
    (root / "var/lib/node-agent").symlink_to("/data/agent-state")
    assert reconcile(root, tmp_path) == 0
    state_dir = root / "data/agent-state"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert (state_dir / "owned.json").is_file()
    assert (root / "var/lib/node-agent").is_symlink()


def test_a_state_file_that_is_a_link_is_not_read_through(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_state = tmp_path / "secret-state.json"
    secret_state.write_text('{"version": 1, "owned": {}}')
    (root / "var/lib/node-agent").mkdir(parents=True)
    (root / "var/lib/node-agent/owned.json").symlink_to(secret_state)
    assert reconcile(root, tmp_path) == 1
    assert "owned.json: is a symlink; refusing to read state" in capsys.readouterr().err


def test_the_daemon_keeps_inside_the_host_root_too(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside/config.toml"
    outside.parent.mkdir()
    outside.write_text("version = 2\n")
    (root / "opt/cfg/config.toml").write_text("version = 2\n")
    (root / "etc/containerd/config.toml").symlink_to("/opt/cfg/config.toml")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"auths": {"reg.example": ENTRY}}))
    argv = [
        "run", "--once", "--no-events", "--secret-file", str(secret),
        "--host-root", str(root), "--reload", "none", "--restart-concurrency", "0",
    ]  # fmt: skip
    assert main(argv, environ={}) == 0
    assert "reg.example" in (root / "opt/cfg/config.toml").read_text()
    assert outside.read_text() == "version = 2\n"
    assert os.path.islink(root / "etc/containerd/config.toml")
