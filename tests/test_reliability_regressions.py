"""Regression tests for the bugs the reliability campaigns found (RELIABILITY.md, "Bugs
found"). Each names the campaign that found it; the campaign itself would find it again, these
say it in one screen."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent.atomic import read_snapshot
from node_agent.credentials import RegistryAuth, normalise_registry, parse_document
from node_agent.errors import InvalidCredentials, RestartFailed, UnsupportedConfig, WriteFailed
from node_agent.ownership import AgentState, LastGood, StateStore
from node_agent.reconcile import NodeFile, Outcome, Reconciler
from node_agent.targets import FormatError
from node_agent.targets.containerd import ContainerdFormat
from node_agent.targets.kubelet import KubeletFormat

CRI = "io.containerd.grpc.v1.cri"
REJECTED = "rejected.example"  # containerd of these tests does not start with this in its config


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@dataclass
class Containerd:
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


def reconciler(root: Path, containerd: Containerd) -> Reconciler:
    files = [
        NodeFile(ContainerdFormat(), root / "config.toml", restarts_containerd=True),
        NodeFile(KubeletFormat(), root / "config.json"),
    ]
    return Reconciler(files, StateStore(root / "state"), containerd)


REJECTED_CREDENTIALS = {REJECTED: RegistryAuth("u", "p")}


# --- crash consistency campaign ---------------------------------------------------------------


def test_a_kill_between_a_failed_restart_and_its_rollback_is_rolled_back_by_the_next_run(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.toml").write_text("version = 2\n")
    containerd = Containerd(tmp_path / "config.toml", kill_after_failed_restart=True)
    with pytest.raises(Killed):
        reconciler(tmp_path, containerd).reconcile(REJECTED_CREDENTIALS)
    containerd.kill_after_failed_restart = False
    outcome = reconciler(tmp_path, containerd).reconcile(REJECTED_CREDENTIALS)
    assert_rolled_back(outcome)
    assert (tmp_path / "config.toml").read_text() == "version = 2\n"
    assert containerd.running == "version = 2\n"  # up again, on the old config


def test_a_kill_before_the_restart_of_a_rejected_config_is_rolled_back_by_the_next_run(
    tmp_path: Path,
) -> None:
    class KilledBeforeRestart(Containerd):
        def restart_and_verify(self) -> None:
            raise Killed

    (tmp_path / "config.toml").write_text("version = 2\n")
    with pytest.raises(Killed):
        reconciler(tmp_path, KilledBeforeRestart(tmp_path / "config.toml")).reconcile(
            REJECTED_CREDENTIALS
        )
    assert REJECTED in (tmp_path / "config.toml").read_text()  # written, never restarted
    containerd = Containerd(tmp_path / "config.toml")
    outcome = reconciler(tmp_path, containerd).reconcile(REJECTED_CREDENTIALS)
    assert_rolled_back(outcome)
    assert (tmp_path / "config.toml").read_text() == "version = 2\n"
    assert StateStore(tmp_path / "state").load().containerd_last_good is None


def test_the_last_good_config_is_kept_in_the_state_only_while_a_restart_is_pending(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    during = AgentState(
        containerd_restart_pending=True,
        containerd_last_good=LastGood(str(tmp_path / "config.toml"), None),
    )
    store.save(during)
    assert store.load() == during
    store.save(AgentState())
    assert "containerd_last_good" not in (tmp_path / "owned.json").read_text()


def test_a_state_with_a_malformed_last_good_is_refused(tmp_path: Path) -> None:
    (tmp_path / "owned.json").write_text(
        '{"version": 1, "owned": {}, "containerd_last_good": {"path": 3}}'
    )
    with pytest.raises(UnsupportedConfig, match="containerd_last_good"):
        StateStore(tmp_path).load()


def test_a_temp_file_a_killed_state_save_left_is_removed_by_the_next_save(tmp_path: Path) -> None:
    leftover = tmp_path / ".owned.json.node-agent-4242.tmp"
    leftover.write_text("{")
    StateStore(tmp_path).save(AgentState())
    assert not leftover.exists()


def test_a_temp_file_beside_a_node_file_that_needs_no_write_is_removed(tmp_path: Path) -> None:
    containerd = Containerd(tmp_path / "config.toml")
    credentials = {"reg.example": RegistryAuth("u", "p")}
    reconciler(tmp_path, containerd).reconcile(credentials)
    leftover = tmp_path / ".config.toml.node-agent-4242.tmp"
    leftover.write_text("half of an old config")
    outcome = reconciler(tmp_path, containerd).reconcile(credentials)
    assert not outcome.changed
    assert not leftover.exists()


# --- I/O faults campaign ----------------------------------------------------------------------


def test_reading_a_fifo_where_a_node_file_should_be_does_not_wait_for_a_writer(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    errors: list[Exception] = []

    def read() -> None:
        try:
            read_snapshot(fifo)
        except WriteFailed as error:
            errors.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck reader go
        pytest.fail("read_snapshot blocked on a FIFO")
    assert "not a regular file" in str(errors[0])


def test_a_symlink_loop_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "config.toml").symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(tmp_path / "config.toml")
    with pytest.raises(WriteFailed, match="symlink loop"):
        read_snapshot(tmp_path / "config.toml")


# --- bad input campaigns ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["https://reg.example\n/v2/", "reg.example:5000\n/x", "\u212aeg.example", "r\u0130.example"],
    ids=["newline before the path", "newline after the port", "KELVIN SIGN", "dotted capital I"],
)
def test_a_registry_key_that_is_no_plain_host_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not a valid registry host"):
        normalise_registry(key)


@pytest.mark.parametrize(
    "document",
    [
        b'{"auths": {"reg.example": {"auth": "\\u00e9t\\u00e9"}}}',
        b'{"kind": "Secret", "type": "kubernetes.io/dockerconfigjson",'
        b' "data": {".dockerconfigjson": "\\u00e9"}}',
    ],
    ids=["auth", "Secret data"],
)
def test_non_ascii_base64_is_invalid_credentials_not_a_traceback(document: bytes) -> None:
    with pytest.raises(InvalidCredentials, match="not valid base64"):
        parse_document("secret.json", document)


PARENTS_AFTER_CHILDREN = (
    "version = 2\n[plugins]\n"
    f'  [plugins."{CRI}".registry.configs."reg.example"]\n'
    f'  [plugins."{CRI}".registry.configs]\n'
    f'  [plugins."{CRI}".registry]\n'
)


def test_a_config_toml_with_parents_after_children_is_edited_not_a_traceback() -> None:
    # tomlkit before 0.15.3 raised AttributeError on this valid TOML; 0.15.3 loads it.
    file_format = ContainerdFormat()
    entry = {"username": "u", "password": "p"}
    edited = file_format.render(PARENTS_AFTER_CHILDREN, {"reg.example": entry})
    assert file_format.entries(edited) == {"reg.example": entry}
    assert file_format.entries(file_format.render(edited, {"reg.example": None})) == {}


def test_a_config_toml_nested_too_deeply_is_refused() -> None:
    file_format = ContainerdFormat()
    with pytest.raises(FormatError, match="refusing"):
        file_format.render(
            "version = 2\na = " + "[" * 5000 + "]" * 5000 + "\n",
            {"reg.example": {"username": "u", "password": "p"}},
        )
