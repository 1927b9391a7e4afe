"""The kubelet's config.json: only the agent's keys change; everything else is kept."""

import json
import re

import pytest

from node_agent.credentials import DOCKER_HUB, RegistryAuth
from node_agent.targets import FormatError, Skip
from node_agent.targets.kubelet import DOCKER_HUB_KEY, KubeletFormat

KUBELET = KubeletFormat()
FOREIGN = {
    "auths": {"quay.io": {"auth": "Zm9yZWlnbjp4"}},
    "credsStore": "none",
    "HttpHeaders": {"X": "1"},
}


def test_basic_credentials_are_written_as_auth() -> None:
    key, entry = KUBELET.desired_entry("reg.example", RegistryAuth("u", "p"))  # type: ignore[misc]
    assert (key, entry) == ("reg.example", {"auth": "dTpw"})


def test_docker_hub_is_written_under_the_docker_cli_key() -> None:
    key, _ = KUBELET.desired_entry(DOCKER_HUB, RegistryAuth("u", "p"))  # type: ignore[misc]
    assert key == DOCKER_HUB_KEY == "https://index.docker.io/v1/"


def test_identitytoken_only_credentials_are_skipped_with_a_reason() -> None:
    result = KUBELET.desired_entry("reg.example", RegistryAuth(identitytoken="t"))
    assert isinstance(result, Skip)
    assert "identitytoken" in result.reason


def test_missing_file_renders_a_minimal_document() -> None:
    text = KUBELET.render(None, {"reg.example": {"auth": "dTpw"}})
    assert json.loads(text) == {"auths": {"reg.example": {"auth": "dTpw"}}}
    assert text.endswith("\n")


def test_foreign_keys_and_entries_are_kept() -> None:
    text = KUBELET.render(json.dumps(FOREIGN, indent=4), {"reg.example": {"auth": "dTpw"}})
    document = json.loads(text)
    assert document["auths"]["quay.io"] == FOREIGN["auths"]["quay.io"]  # type: ignore[index]
    assert document["credsStore"] == "none"
    assert document["HttpHeaders"] == {"X": "1"}
    assert '\n    "auths"' in text  # the file's own indentation is kept


def test_removal_deletes_only_that_key() -> None:
    text = json.dumps({"auths": {"reg.example": {"auth": "dTpw"}, "quay.io": {"auth": "eA=="}}})
    assert json.loads(KUBELET.render(text, {"reg.example": None})) == {
        "auths": {"quay.io": {"auth": "eA=="}}
    }


def test_no_updates_return_the_text_unchanged() -> None:
    text = '{ "auths" : {"quay.io": {"auth": "eA=="}} }'
    assert KUBELET.render(text, {}) == text


def test_entries_are_read_by_file_key() -> None:
    assert KUBELET.entries(json.dumps(FOREIGN)) == {"quay.io": {"auth": "Zm9yZWlnbjp4"}}
    assert KUBELET.entries(None) == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not valid JSON (line 1, column 2)"),
        ('{\n  "auths": {\n    "r": {"auth": "SECRET",}\n  }\n}', "(line 3, column 28)"),
        ("[]", "not a JSON object"),
        ('{"auths": []}', "'auths' is not an object"),
        ('{"auths": {"r": 1}}', 'auths["r"] is not an object'),
    ],
)
def test_files_it_cannot_edit_are_refused(text: str, problem: str) -> None:
    with pytest.raises(FormatError, match=re.escape(problem)):
        KUBELET.render(text, {"reg.example": {"auth": "dTpw"}})


def test_redact_hides_every_credential_value() -> None:
    values = {"auth": "c2VjcmV0", "username": "user-1", "password": "pw-2", "identitytoken": "it-3"}
    text = json.dumps({"auths": {"r": {**values, "email": "a@b"}}})
    redacted = KUBELET.redact(text)
    for value in values.values():
        assert value not in redacted
    assert "a@b" in redacted
