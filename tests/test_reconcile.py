"""The reconcile use case on real files in tmp_path: what is written, what restarts, what is
kept, and what happens when containerd does not come back or someone races us."""

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node_agent.credentials import DOCKER_HUB, Credentials, RegistryAuth
from node_agent.errors import InternalError, RestartFailed, UnsupportedConfig, WriteFailed
from node_agent.ownership import AgentState, StateStore
from node_agent.reconcile import NodeFile, Outcome, Reconciler
from node_agent.targets import Entry
from node_agent.targets.containerd import ContainerdFormat
from node_agent.targets.kubelet import KubeletFormat

CRI = "io.containerd.grpc.v1.cri"
CONTAINERD_CONFIG = f"""# node image config
version = 2

[plugins]
  [plugins."{CRI}"]
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins."{CRI}".registry]
      config_path = "/etc/containerd/certs.d"
      [plugins."{CRI}".registry.configs]
        [plugins."{CRI}".registry.configs."foreign.example".auth]
          username = "theirs"
          password = "their-password"
"""
KUBELET_CONFIG = json.dumps(
    {
        "auths": {
            "https://index.docker.io/v1/": {"auth": "b2xkOmxvZ2lu"},
            "quay.io": {"auth": "cTpx"},
        }
    },
    indent=2,
)
CREDENTIALS: Credentials = {"reg.example:5000": RegistryAuth("puller", "pw-1")}


@dataclass
class RecordingRestart:
    """A containerd that restarts on request and can be told to fail the next restarts."""

    failures_left: int = 0
    restarts: int = 0

    def restart_and_verify(self) -> None:
        self.restarts += 1
        if self.failures_left:
            self.failures_left -= 1
            raise RestartFailed("CRI did not answer Version within 30s")


@dataclass
class Node:
    root: Path
    containerd: RecordingRestart

    @property
    def config_toml(self) -> Path:
        return self.root / "config.toml"

    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def state(self) -> StateStore:
        return StateStore(self.root / "state")

    def reconciler(
        self, *, kubelet_format: Any = None, targets: tuple[str, ...] = ("containerd", "kubelet")
    ) -> Reconciler:
        files = {
            "containerd": NodeFile(ContainerdFormat(), self.config_toml, restarts_containerd=True),
            "kubelet": NodeFile(kubelet_format or KubeletFormat(), self.config_json),
        }
        return Reconciler([files[t] for t in targets], self.state, self.containerd)

    def toml_auths(self) -> dict[str, Any]:
        data = tomllib.loads(self.config_toml.read_text())
        configs: dict[str, Any] = data["plugins"][CRI]["registry"]["configs"]
        return {host: table["auth"] for host, table in configs.items() if "auth" in table}

    def json_auths(self) -> dict[str, Any]:
        auths: dict[str, Any] = json.loads(self.config_json.read_text())["auths"]
        return auths


@pytest.fixture
def node(tmp_path: Path) -> Node:
    (tmp_path / "config.toml").write_text(CONTAINERD_CONFIG)
    (tmp_path / "config.json").write_text(KUBELET_CONFIG)
    return Node(tmp_path, RecordingRestart())


def test_first_pass_writes_both_files_and_restarts_containerd_once(node: Node) -> None:
    outcome = node.reconciler().reconcile(CREDENTIALS)
    assert node.toml_auths()["reg.example:5000"] == {"username": "puller", "password": "pw-1"}
    assert node.json_auths()["reg.example:5000"] == {"auth": "cHVsbGVyOnB3LTE="}
    assert node.containerd.restarts == 1
    assert set(outcome.written) == {"containerd", "kubelet"}


def test_foreign_entries_survive(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    assert node.toml_auths()["foreign.example"] == {
        "username": "theirs",
        "password": "their-password",
    }
    assert node.json_auths()["quay.io"] == {"auth": "cTpx"}
    assert 'config_path = "/etc/containerd/certs.d"' in node.config_toml.read_text()


def test_second_pass_writes_nothing_and_restarts_nothing(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    mtimes = (node.config_toml.stat().st_mtime_ns, node.config_json.stat().st_mtime_ns)
    outcome = node.reconciler().reconcile(CREDENTIALS)
    assert not outcome.changed
    assert (node.config_toml.stat().st_mtime_ns, node.config_json.stat().st_mtime_ns) == mtimes
    assert node.containerd.restarts == 1


def test_a_kubelet_only_change_restarts_nothing(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    node.config_json.write_text(KUBELET_CONFIG)  # someone dropped our entry
    outcome = node.reconciler().reconcile(CREDENTIALS)
    assert outcome.written == ("kubelet",)
    assert node.containerd.restarts == 1


def test_password_rotation_updates_both_files_and_restarts(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    node.reconciler().reconcile({"reg.example:5000": RegistryAuth("puller", "pw-2")})
    assert node.toml_auths()["reg.example:5000"]["password"] == "pw-2"
    assert node.containerd.restarts == 2


def test_registry_removed_from_the_secret_is_removed_from_both_files(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    node.reconciler().reconcile({})
    assert node.config_toml.read_text() == CONTAINERD_CONFIG
    assert "reg.example:5000" not in node.json_auths()
    assert node.state.load() == AgentState()


def test_docker_hub_is_taken_over_per_consumer_key_and_restored_when_it_leaves(node: Node) -> None:
    hub = {DOCKER_HUB: RegistryAuth("hub-user", "hub-token")}
    node.reconciler().reconcile(hub)
    assert node.toml_auths()["registry-1.docker.io"] == {
        "username": "hub-user",
        "password": "hub-token",
    }
    assert node.json_auths()["https://index.docker.io/v1/"] == {"auth": "aHViLXVzZXI6aHViLXRva2Vu"}
    node.reconciler().reconcile({})
    assert node.json_auths()["https://index.docker.io/v1/"] == {"auth": "b2xkOmxvZ2lu"}
    assert "registry-1.docker.io" not in node.toml_auths()


def test_taking_over_a_foreign_containerd_entry_and_giving_it_back(node: Node) -> None:
    node.reconciler().reconcile({"foreign.example": RegistryAuth("ours", "our-password")})
    assert node.toml_auths()["foreign.example"] == {"username": "ours", "password": "our-password"}
    node.reconciler().reconcile({})
    assert node.config_toml.read_text() == CONTAINERD_CONFIG


def test_missing_files_are_created(tmp_path: Path) -> None:
    node = Node(tmp_path, RecordingRestart())
    node.reconciler().reconcile(CREDENTIALS)
    assert tomllib.loads(node.config_toml.read_text())["version"] == 2
    assert node.json_auths() == {"reg.example:5000": {"auth": "cHVsbGVyOnB3LTE="}}
    assert node.config_json.stat().st_mode & 0o777 == 0o600


def test_containerd_not_coming_back_rolls_config_toml_back(node: Node) -> None:
    node.containerd.failures_left = 1
    outcome = node.reconciler().reconcile(CREDENTIALS)
    assert outcome.restart is not None and outcome.restart.result == "rolled_back"
    assert outcome.restart.error is not None
    assert outcome.restart.error.endswith(
        "; previous config.toml restored and containerd restarted healthy"
    )
    assert outcome.in_sync_by_target == {"containerd": False, "kubelet": True}
    assert set(outcome.written) == {"kubelet", "containerd"}
    assert node.config_toml.read_text() == CONTAINERD_CONFIG
    assert node.containerd.restarts == 2
    assert not node.state.load().containerd_restart_pending


def test_rollback_that_also_fails_says_so_and_keeps_the_restart_pending(node: Node) -> None:
    node.containerd.failures_left = 2
    outcome = node.reconciler().reconcile(CREDENTIALS)
    assert outcome.restart is not None and outcome.restart.result == "failed"
    assert outcome.restart.error is not None and "still failed" in outcome.restart.error
    assert node.config_toml.read_text() == CONTAINERD_CONFIG
    assert node.state.load().containerd_restart_pending


@pytest.mark.parametrize(
    ("failures", "result", "restarts"),
    [(0, "success", 1), (1, "rolled_back", 2), (2, "failed", 2)],
)
def test_each_restart_attempt_is_timed_for_the_restart_gate(
    node: Node, failures: int, result: str, restarts: int
) -> None:
    ticks = iter(range(100, 200))
    node.containerd.failures_left = failures
    reconciler = node.reconciler()
    reconciler.clock = lambda: float(next(ticks))
    outcome = reconciler.reconcile(CREDENTIALS)
    assert outcome.restart is not None and outcome.restart.result == result
    assert node.containerd.restarts == restarts
    # The last attempt's start: the rollback's restart, when there was one.
    assert outcome.restart.last_attempt_at == 100.0 + restarts - 1


def test_a_restart_left_pending_with_nothing_to_roll_back_to_fails(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    node.state.save(AgentState(owned=node.state.load().owned, containerd_restart_pending=True))
    node.containerd.failures_left = 1
    outcome = node.reconciler().reconcile(CREDENTIALS)
    assert outcome.restart is not None and outcome.restart.result == "failed"
    assert outcome.written == ()
    assert node.containerd.restarts == 2
    assert node.state.load().containerd_restart_pending


def test_without_permission_to_restart_containerd_its_file_waits_and_is_owed_a_restart(
    node: Node,
) -> None:
    before = node.config_toml.read_bytes()
    outcome = node.reconciler().reconcile(CREDENTIALS, may_restart=False)
    assert outcome.written == ("kubelet",)
    assert outcome.restart is None and outcome.restart_owed
    assert outcome.in_sync_by_target == {"containerd": False, "kubelet": True}
    assert node.config_toml.read_bytes() == before
    assert node.containerd.restarts == 0
    assert "containerd" not in node.state.load().owned  # nothing of it taken yet
    outcome = node.reconciler().reconcile(CREDENTIALS, may_restart=True)
    assert outcome.written == ("containerd",)
    assert outcome.restart is not None and outcome.restart.succeeded
    assert not outcome.restart_owed and outcome.in_sync


def test_a_dry_run_reconciler_only_inspects(node: Node) -> None:
    before = (node.config_toml.read_bytes(), node.config_json.read_bytes())
    reconciler = node.reconciler()
    reconciler.dry_run = True
    outcome = reconciler.reconcile(CREDENTIALS)
    assert outcome.dry_run and outcome.written == () and outcome.restart is None
    assert [p.needs_write for p in outcome.files] == [True, True]
    assert (node.config_toml.read_bytes(), node.config_json.read_bytes()) == before
    assert not node.state.path.exists() and node.containerd.restarts == 0


def test_a_restart_interrupted_by_a_crash_happens_on_the_next_pass(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    # As if the process died after writing config.toml but before restarting containerd.
    node.state.save(AgentState(owned=node.state.load().owned, containerd_restart_pending=True))
    outcome = node.reconciler().reconcile(CREDENTIALS)
    assert outcome.restart is not None and outcome.restart.succeeded
    assert node.containerd.restarts == 2
    assert not node.state.load().containerd_restart_pending


def test_a_broken_containerd_config_changes_nothing_anywhere(node: Node) -> None:
    node.config_toml.write_text("version = 2\n[plugins\n")
    with pytest.raises(UnsupportedConfig, match=r"config\.toml"):
        node.reconciler().reconcile(CREDENTIALS)
    assert node.config_json.read_text() == KUBELET_CONFIG
    assert not node.state.path.exists()
    assert node.containerd.restarts == 0


class RacingKubeletFormat(KubeletFormat):
    """The kubelet format, except that the first render lets another writer edit the file
    between our read and our rename."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raced = False

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        if not self.raced:
            self.raced = True
            document = json.loads(self.path.read_text())
            document["auths"]["other-tool.example"] = {"auth": "b3RoZXI6dG9vbA=="}
            self.path.write_text(json.dumps(document))
        return super().render(text, updates)


def test_a_concurrent_edit_is_kept_and_the_pass_redone(node: Node) -> None:
    node.reconciler(kubelet_format=RacingKubeletFormat(node.config_json)).reconcile(CREDENTIALS)
    assert node.json_auths()["other-tool.example"] == {"auth": "b3RoZXI6dG9vbA=="}
    assert node.json_auths()["reg.example:5000"] == {"auth": "cHVsbGVyOnB3LTE="}


def test_managing_one_target_keeps_what_is_owned_in_the_other(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    node.reconciler(targets=("kubelet",)).reconcile({})
    assert "containerd" in node.state.load().owned
    assert "reg.example:5000" in node.toml_auths()


def test_inspect_reports_differences_without_writing(node: Node) -> None:
    before = node.config_toml.read_bytes()
    outcome = node.reconciler().inspect(CREDENTIALS)
    assert not outcome.in_sync
    assert node.config_toml.read_bytes() == before
    assert not node.state.path.exists()


def test_a_pass_that_does_not_manage_containerd_keeps_its_restart_pending(node: Node) -> None:
    node.reconciler().reconcile(CREDENTIALS)
    node.state.save(AgentState(owned=node.state.load().owned, containerd_restart_pending=True))
    node.reconciler(targets=("kubelet",)).reconcile(CREDENTIALS)
    assert node.state.load().containerd_restart_pending
    node.reconciler().reconcile(CREDENTIALS)
    assert not node.state.load().containerd_restart_pending
    assert node.containerd.restarts == 2


# Taking over what a node image wrote for a registry, and giving it back

NODE_IMAGE_HOST = "image.example"
NODE_IMAGE_CONFIGS = f'[plugins."{CRI}".registry.configs'
#: Shapes a node image or an install script leaves for a registry the Secret then names.
TAKEOVER_SHAPES = {
    "only auth": f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}".auth]\n  auth = "b2xkOm9sZA=="\n',
    "only username": f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}".auth]\n  username = "old"\n',
    "identitytoken only": (
        f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}".auth]\n  identitytoken = "old-token"\n'
    ),
    "dotted keys": (
        f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}"]\n'
        '  auth.auth = "b2xkOm9sZA=="\n'
        "  tls.insecure_skip_verify = true\n"
    ),
    "dotted keys, the auth line last": (
        f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}"]\n'
        "  tls.insecure_skip_verify = true\n"
        '  auth.identitytoken = "old-token" # from the image\n'
    ),
    "inline table": (
        f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}"]\n  auth = {{ auth = "b2xkOm9sZA==" }}\n'
    ),
    "inline host table": (
        f"{NODE_IMAGE_CONFIGS}]\n"
        f'  "{NODE_IMAGE_HOST}" = {{ auth = {{ username = "old", auth = "b2xkOm9sZA==" }} }}\n'
    ),
    "fields in an odd order": (
        f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}".auth]\n'
        '  password = "old-password"\n'
        '  auth = "b2xkOm9sZA=="\n'
        '  username = "old"\n'
    ),
    "auth field last, a comment below": (
        f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}".auth]\n'
        '  username = "old"\n'
        '  auth = "b2xkOm9sZA=="\n'
        "\n"
        "# the next table\n"
        '[plugins."io.containerd.internal.v1.opt"]\n'
        '  path = "/opt/containerd"\n'
    ),
    "no final newline": f'{NODE_IMAGE_CONFIGS}."{NODE_IMAGE_HOST}".auth]\n  auth = "b2xkOm9sZA=="',
}


#: Where giving back restores the entry's values but not its exact text: a comment on a line
#: the takeover removed, the order of fields, a missing final newline.
RESTORED_AS_DATA_ONLY = {
    "dotted keys, the auth line last",
    "fields in an odd order",
    "no final newline",
}


@pytest.mark.parametrize("name", TAKEOVER_SHAPES)
def test_an_entry_the_node_image_wrote_is_taken_over_and_given_back(
    tmp_path: Path, name: str
) -> None:
    shape = TAKEOVER_SHAPES[name]
    original = f"version = 2\n\n{shape}"
    (tmp_path / "config.toml").write_text(original)
    node = Node(tmp_path, RecordingRestart())
    node.reconciler(targets=("containerd",)).reconcile(
        {NODE_IMAGE_HOST: RegistryAuth("u", "p")}
    )
    assert node.toml_auths()[NODE_IMAGE_HOST] == {"username": "u", "password": "p"}
    untouched = tomllib.loads(original)["plugins"][CRI]["registry"]["configs"][NODE_IMAGE_HOST]
    taken_over = tomllib.loads(node.config_toml.read_text())
    assert taken_over["plugins"][CRI]["registry"]["configs"][NODE_IMAGE_HOST] == {
        **untouched,
        "auth": {"username": "u", "password": "p"},
    }
    node.reconciler(targets=("containerd",)).reconcile({})
    given_back = node.config_toml.read_text()
    assert tomllib.loads(given_back) == tomllib.loads(original)
    if name not in RESTORED_AS_DATA_ONLY:
        assert given_back == original
    assert node.state.load() == AgentState()
    assert node.containerd.restarts == 2


# An unexpected failure is a bug, reported on one line


class BrokenContainerdFormat(ContainerdFormat):
    """containerd's format with a bug in render (the kind a library release can bring)."""

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        raise AttributeError(f"'Container' object has no attribute {self.quoted_input!r}")

    quoted_input = "SECRET"


def test_an_unexpected_failure_names_the_file_and_changes_nothing(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    broken = NodeFile(BrokenContainerdFormat(), node.config_toml, restarts_containerd=True)
    reconciler = Reconciler([broken], node.state, node.containerd)
    with caplog.at_level("DEBUG"), pytest.raises(InternalError) as failed:
        reconciler.reconcile(CREDENTIALS)
    message = str(failed.value)
    assert message.startswith(
        f"unexpected AttributeError while editing the containerd file {node.config_toml};"
    )
    assert "please report it" in message and "\n" not in message
    assert "SECRET" not in message and "SECRET" not in caplog.text
    assert "in render" in caplog.text  # where it happened, for the report
    assert node.config_toml.read_text() == CONTAINERD_CONFIG
    assert not node.state.path.exists()


# All or nothing across the node files of a pass


def block_temp_file(path: Path) -> None:
    """Make the next write of `path` fail: its temp file's name is taken by a directory
    (the agent's temp files are `.NAME.node-agent-PID.tmp`, beside the target)."""
    (path.parent / f".{path.name}.node-agent-{os.getpid()}.tmp").mkdir()


def unblock_temp_file(path: Path) -> None:
    (path.parent / f".{path.name}.node-agent-{os.getpid()}.tmp").rmdir()


@pytest.mark.parametrize("failing", ["kubelet", "containerd"])
@pytest.mark.parametrize("state_before", ["absent", "present"])
def test_a_write_that_fails_puts_back_every_file_of_the_pass_and_the_state(
    node: Node, failing: str, state_before: str
) -> None:
    if state_before == "present":
        node.reconciler().reconcile({"old.example": RegistryAuth("u", "old")})
    files = {"kubelet": node.config_json, "containerd": node.config_toml}
    before = {name: path.read_bytes() for name, path in files.items()}
    state = node.state.path.read_bytes() if node.state.path.exists() else None
    restarts = node.containerd.restarts
    block_temp_file(files[failing])
    with pytest.raises(WriteFailed, match="cannot create temp file"):
        node.reconciler().reconcile(CREDENTIALS)
    assert {name: path.read_bytes() for name, path in files.items()} == before
    assert (node.state.path.read_bytes() if node.state.path.exists() else None) == state
    assert node.containerd.restarts == restarts
    unblock_temp_file(files[failing])
    node.reconciler().reconcile(CREDENTIALS)  # once the fault is gone, the pass goes through
    assert node.toml_auths()["reg.example:5000"]["password"] == "pw-1"


@pytest.mark.parametrize("missing", ["containerd", "kubelet"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["real run", "dry run"])
def test_a_missing_directory_fails_before_anything_is_written(
    tmp_path: Path, missing: str, dry_run: bool
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "kubelet").mkdir()
    toml_path, json_path = tmp_path / "etc/config.toml", tmp_path / "kubelet/config.json"
    toml_path.write_text(CONTAINERD_CONFIG)
    json_path.write_text(KUBELET_CONFIG)
    gone = toml_path if missing == "containerd" else json_path
    gone.unlink()
    gone.parent.rmdir()
    node = Node(tmp_path, RecordingRestart())
    files = [
        NodeFile(ContainerdFormat(), toml_path, restarts_containerd=True),
        NodeFile(KubeletFormat(), json_path),
    ]
    reconciler = Reconciler(files, node.state, node.containerd, dry_run=dry_run)
    with pytest.raises(WriteFailed, match=f"{gone.parent}: directory does not exist"):
        reconciler.reconcile(CREDENTIALS)
    kept = json_path if missing == "containerd" else toml_path
    assert kept.read_text() == (KUBELET_CONFIG if kept == json_path else CONTAINERD_CONFIG)
    assert not (tmp_path / "state").exists()


# --- a kill around a containerd restart ----------------------------------------------------


REJECTED = "rejected.example"  # containerd of these tests does not start with this in its config


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@dataclass
class RejectingContainerd:
    """Runs the config.toml it was last restarted on; fails to start on one naming
    `REJECTED`. `kill_after_failed_restart` kills the agent right after such a failure."""

    config: Path
    running: str | None = None
    kill_after_failed_restart: bool = False

    def restart_and_verify(self) -> None:
        text = self.config.read_text() if self.config.exists() else ""
        if REJECTED in text:
            self.running = None
            if self.kill_after_failed_restart:
                raise Killed
            raise RestartFailed("CRI did not answer")
        self.running = text


def assert_rolled_back(outcome: Outcome) -> None:
    assert outcome.restart is not None and outcome.restart.result == "rolled_back"
    assert outcome.restart.error is not None
    assert "previous config.toml restored" in outcome.restart.error


def reconciler_for(root: Path, containerd: RejectingContainerd) -> Reconciler:
    files = [
        NodeFile(ContainerdFormat(), root / "config.toml", restarts_containerd=True),
        NodeFile(KubeletFormat(), root / "config.json"),
    ]
    return Reconciler(files, StateStore(root / "state"), containerd)


REJECTED_CREDENTIALS = {REJECTED: RegistryAuth("u", "p")}


def test_a_kill_between_a_failed_restart_and_its_rollback_is_rolled_back_by_the_next_run(
    tmp_path: Path,
) -> None:
    """Found by: crash (RELIABILITY.md, "Bugs found")."""
    (tmp_path / "config.toml").write_text("version = 2\n")
    containerd = RejectingContainerd(tmp_path / "config.toml", kill_after_failed_restart=True)
    with pytest.raises(Killed):
        reconciler_for(tmp_path, containerd).reconcile(REJECTED_CREDENTIALS)
    containerd.kill_after_failed_restart = False
    outcome = reconciler_for(tmp_path, containerd).reconcile(REJECTED_CREDENTIALS)
    assert_rolled_back(outcome)
    assert (tmp_path / "config.toml").read_text() == "version = 2\n"
    assert containerd.running == "version = 2\n"  # up again, on the old config


def test_a_kill_before_the_restart_of_a_rejected_config_is_rolled_back_by_the_next_run(
    tmp_path: Path,
) -> None:
    """Found by: crash (RELIABILITY.md, "Bugs found")."""
    class KilledBeforeRestart(RejectingContainerd):
        def restart_and_verify(self) -> None:
            raise Killed

    (tmp_path / "config.toml").write_text("version = 2\n")
    with pytest.raises(Killed):
        reconciler_for(tmp_path, KilledBeforeRestart(tmp_path / "config.toml")).reconcile(
            REJECTED_CREDENTIALS
        )
    assert REJECTED in (tmp_path / "config.toml").read_text()  # written, never restarted
    containerd = RejectingContainerd(tmp_path / "config.toml")
    outcome = reconciler_for(tmp_path, containerd).reconcile(REJECTED_CREDENTIALS)
    assert_rolled_back(outcome)
    assert (tmp_path / "config.toml").read_text() == "version = 2\n"
    assert StateStore(tmp_path / "state").load().containerd_last_good is None


def test_a_temp_file_beside_a_node_file_that_needs_no_write_is_removed(tmp_path: Path) -> None:
    """Found by: crash (RELIABILITY.md, "Bugs found")."""
    containerd = RejectingContainerd(tmp_path / "config.toml")
    credentials = {"reg.example": RegistryAuth("u", "p")}
    reconciler_for(tmp_path, containerd).reconcile(credentials)
    leftover = tmp_path / ".config.toml.node-agent-4242.tmp"
    leftover.write_text("half of an old config")
    outcome = reconciler_for(tmp_path, containerd).reconcile(credentials)
    assert not outcome.changed
    assert not leftover.exists()
