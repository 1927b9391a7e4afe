"""The leak audit itself (tests/leak_audit.py): it must catch the canary in every channel it
claims to watch, accept it where it belongs, and check modes. A leak audit that cannot fail
would prove nothing."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest
from leak_audit import CANARY_PASSWORD, CANARY_TOKEN, CANARY_USERNAME, LeakAudit

from node_agent.errors import InvalidCredentials, WriteFailed
from node_agent.metrics import AgentMetrics
from node_agent.targets import FormatError


@pytest.fixture
def audit(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> LeakAudit:
    audit = LeakAudit(root=tmp_path, capture=capfd)
    audit.install(monkeypatch)
    return audit


def assert_caught(audit: LeakAudit, where: str) -> None:
    with pytest.raises(pytest.fail.Exception, match="canary found") as failure:
        audit.finish()
    assert where in str(failure.value)
    assert CANARY_PASSWORD not in str(failure.value)  # the report shows <CANARY> instead


def test_nothing_to_report_when_nothing_leaked(audit: LeakAudit, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing secret")
    logging.getLogger("node_agent.test").warning("reg.example: updated")
    audit.finish()


@pytest.mark.parametrize("form", [CANARY_PASSWORD, CANARY_TOKEN, CANARY_TOKEN + "=="])
def test_a_log_record_is_caught_even_after_the_root_handlers_were_replaced(
    form: str, audit: LeakAudit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As configure_logging does (pytest's own capture handler is gone too).
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    logging.getLogger("node_agent.reconcile").warning("wrote %s", form)
    assert_caught(audit, "log record node_agent.reconcile")


def test_stderr_written_below_python_is_caught(audit: LeakAudit) -> None:
    os.write(2, f"auth={CANARY_TOKEN}\n".encode())
    assert_caught(audit, "stderr")


def test_an_error_message_is_caught_even_if_never_raised(audit: LeakAudit) -> None:
    InvalidCredentials("secret.json", "auth", f"bad value {CANARY_PASSWORD}")
    assert_caught(audit, "InvalidCredentials message")


def test_a_format_error_is_caught(audit: LeakAudit) -> None:
    FormatError(f"cannot parse {CANARY_PASSWORD}")
    assert_caught(audit, "FormatError message")


def test_the_cause_of_a_caught_exception_is_checked(audit: LeakAudit) -> None:
    try:
        try:
            raise KeyError(CANARY_PASSWORD)
        except KeyError as cause:
            raise WriteFailed("config.toml: cannot write") from cause
    except WriteFailed as error:
        audit.check_exception(error)
    assert_caught(audit, "exception KeyError")


def test_a_metric_label_is_caught(audit: LeakAudit) -> None:
    metrics = AgentMetrics(process=False)
    metrics.add_sources([f"user:{CANARY_PASSWORD}"])
    assert_caught(audit, "metrics")


def test_a_stray_file_is_caught_but_the_node_files_and_sources_are_allowed(
    audit: LeakAudit, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "owned.json").write_text(CANARY_PASSWORD)
    (state / "owned.json").chmod(0o600)
    target = tmp_path / "config.json"
    target.write_text(CANARY_TOKEN)
    target.chmod(0o600)
    secret = tmp_path / "secret.json"
    secret.write_text(CANARY_PASSWORD)
    audit.allow(secret)
    audit.guard_node(files=[target], state_dir=state)
    audit.finish()
    (tmp_path / ".config.json.node-agent-99.tmp").write_text(CANARY_TOKEN)
    assert_caught(audit, ".config.json.node-agent-99.tmp")


def test_a_node_file_holding_the_credential_must_be_private(
    audit: LeakAudit, tmp_path: Path
) -> None:
    target = tmp_path / "config.toml"
    target.write_text(f'password = "{CANARY_PASSWORD}"')
    target.chmod(0o644)
    audit.guard_node(files=[target])
    assert_caught(audit, "mode: ")


@pytest.mark.parametrize(("directory", "file"), [(0o755, 0o600), (0o700, 0o644)])
def test_the_state_dir_is_0700_and_owned_json_0600(
    directory: int, file: int, audit: LeakAudit, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "owned.json").write_text("{}")
    (state / "owned.json").chmod(file)
    state.chmod(directory)
    audit.guard_node(files=[], state_dir=state)
    assert_caught(audit, "mode: ")


def test_the_canary_forms_are_the_password_and_its_docker_auth() -> None:
    decoded = base64.b64decode(CANARY_TOKEN + "=" * (-len(CANARY_TOKEN) % 4)).decode()
    assert decoded == f"{CANARY_USERNAME}:{CANARY_PASSWORD}"
