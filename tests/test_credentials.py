"""Credentials in: every accepted document shape, key normalisation, priority, and the
one-line errors for bad input."""

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from support.dockerconfig import docker_config

from node_agent.credentials import (
    DOCKER_HUB,
    RegistryAuth,
    merge_by_priority,
    normalise_registry,
    parse_document,
    parse_secret_data,
)
from node_agent.errors import InvalidCredentials
from node_agent.secret_files import load_credentials, load_secret_file

PASSWORD = "s3cr3t-Pa55"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        ("registry.example.com", "registry.example.com"),
        ("Registry.Example.COM", "registry.example.com"),
        ("https://registry.example.com", "registry.example.com"),
        ("http://registry.example.com:5000/v2/", "registry.example.com:5000"),
        ("registry.example.com/some/path", "registry.example.com"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("[::1]:5000", "[::1]:5000"),
        ("docker.io", DOCKER_HUB),
        ("index.docker.io", DOCKER_HUB),
        ("registry-1.docker.io", DOCKER_HUB),
        ("https://index.docker.io/v1/", DOCKER_HUB),
        ("*.example.com", "*.example.com"),
    ],
)
def test_registry_keys_are_normalised(key: str, registry: str) -> None:
    assert normalise_registry(key) == registry


@pytest.mark.parametrize("key", ["", "   ", "https://", "/v2/", "bad host", "a:b:c"])
def test_keys_without_a_valid_host_are_rejected(key: str) -> None:
    with pytest.raises(ValueError, match="host"):
        normalise_registry(key)


def test_dockerconfigjson_with_username_and_password() -> None:
    raw = docker_config({"reg.example": {"username": "u", "password": PASSWORD}})
    assert parse_document("s", raw) == {"reg.example": RegistryAuth("u", PASSWORD)}


def test_auth_field_is_decoded_and_wins_over_username_password() -> None:
    raw = docker_config(
        {"reg.example": {"auth": b64(f"u:{PASSWORD}"), "username": "x", "password": "y"}}
    )
    assert parse_document("s", raw) == {"reg.example": RegistryAuth("u", PASSWORD)}


def test_auth_splits_at_the_first_colon() -> None:
    raw = docker_config({"reg.example": {"auth": b64("u:pa:ss")}})
    assert parse_document("s", raw)["reg.example"].password == "pa:ss"


def test_unpadded_base64_auth_is_accepted_like_kubelet_does() -> None:
    unpadded = b64("user:pw").rstrip("=")
    raw = docker_config({"reg.example": {"auth": unpadded}})
    assert parse_document("s", raw)["reg.example"] == RegistryAuth("user", "pw")


def test_identitytoken_only_entry() -> None:
    raw = docker_config({"reg.example": {"identitytoken": "tok"}})
    assert parse_document("s", raw) == {"reg.example": RegistryAuth(identitytoken="tok")}


def test_legacy_dockercfg_document() -> None:
    raw = json.dumps({"https://reg.example/v1/": {"auth": b64("u:p"), "email": "a@b"}}).encode()
    assert parse_document("s", raw) == {"reg.example": RegistryAuth("u", "p")}


def test_secret_manifest_yaml_with_base64_data() -> None:
    inner = docker_config({"reg.example": {"auth": b64("u:p")}})
    manifest = (
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/dockerconfigjson\n"
        f"data:\n  .dockerconfigjson: {base64.b64encode(inner).decode()}\n"
    )
    assert parse_document("s", manifest.encode()) == {"reg.example": RegistryAuth("u", "p")}


def test_secret_manifest_with_string_data_and_legacy_type() -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockercfg",
        "stringData": {".dockercfg": json.dumps({"reg.example": {"auth": b64("u:p")}})},
    }
    assert parse_document("s", json.dumps(manifest).encode()) == {
        "reg.example": RegistryAuth("u", "p")
    }


def opaque_manifest(data: dict[str, str], *, field: str = "data") -> bytes:
    return json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", field: data}
    ).encode()


@pytest.mark.parametrize("field", ["data", "stringData"])
def test_an_opaque_secret_with_a_dockerconfigjson_key_is_read_with_a_warning(field: str) -> None:
    inner = docker_config({"reg.example": {"auth": b64(f"u:{PASSWORD}")}}).decode()
    value = b64(inner) if field == "data" else inner
    warnings: list[str] = []
    parsed = parse_document(
        "s.yaml", opaque_manifest({".dockerconfigjson": value}, field=field), warnings
    )
    assert parsed == {"reg.example": RegistryAuth("u", PASSWORD)}
    (warning,) = warnings
    assert warning.startswith("s.yaml: type: Opaque, read as kubernetes.io/dockerconfigjson")
    assert "kubectl create secret docker-registry" in warning and PASSWORD not in warning


def test_an_opaque_secret_from_the_api_with_a_dockerconfigjson_key_is_read_with_a_warning() -> None:
    inner = docker_config({"reg.example": {"username": "u", "password": PASSWORD}})
    warnings: list[str] = []
    parsed = parse_secret_data("ns/name", "Opaque", {".dockerconfigjson": inner}, warnings)
    assert parsed == {"reg.example": RegistryAuth("u", PASSWORD)}
    assert len(warnings) == 1 and warnings[0].startswith("ns/name: type: Opaque")


@pytest.mark.parametrize(
    ("secret_type", "data"),
    [
        ("Opaque", {"config.json": docker_config({})}),  # the document under another key
        ("Opaque", {".dockercfg": b"{}"}),  # only .dockerconfigjson is taken for its type
        ("kubernetes.io/basic-auth", {".dockerconfigjson": docker_config({})}),
    ],
)
def test_a_secret_of_another_type_is_invalid_showing_the_type_and_how_to_create_one(
    secret_type: str, data: dict[str, bytes]
) -> None:
    with pytest.raises(InvalidCredentials) as caught:
        parse_secret_data("ns/name", secret_type, data, [])
    assert caught.value.field == "type"
    assert caught.value.problem.startswith(f"found {secret_type}; expected ")
    assert "kubectl create secret docker-registry" in caught.value.problem


def test_a_manifest_without_a_type_says_so() -> None:
    manifest = {"apiVersion": "v1", "kind": "Secret", "data": {}}
    with pytest.raises(InvalidCredentials, match=r"type: no type; expected "):
        parse_document("s.yaml", json.dumps(manifest).encode())


def test_a_hostile_type_is_shown_escaped_and_bounded() -> None:
    secret_type = "x\x1b[31m\n" + "word " * 100
    with pytest.raises(InvalidCredentials) as caught:
        parse_secret_data("ns/name", secret_type, {})
    message = str(caught.value)
    assert "\x1b" not in message and "\n" not in message
    assert r"found x\x1b[31m\nword word" in message
    assert "more characters)" in message and len(message) < 400


def test_docker_hub_aliases_are_one_registry() -> None:
    raw = docker_config(
        {
            "https://index.docker.io/v1/": {"auth": b64("u:p")},
            "docker.io": {"username": "u", "password": "p"},
        }
    )
    assert parse_document("s", raw) == {DOCKER_HUB: RegistryAuth("u", "p")}


def test_two_credentials_for_one_registry_in_one_source_is_an_error() -> None:
    raw = docker_config(
        {"docker.io": {"auth": b64("u:p")}, "index.docker.io": {"auth": b64("u:other")}}
    )
    with pytest.raises(InvalidCredentials, match=r'auths\["index.docker.io"\]: a different'):
        parse_document("secret.json", raw)


def test_higher_priority_source_wins_and_lower_ones_only_add() -> None:
    high = {"a.example": RegistryAuth("high", "1")}
    low = {"a.example": RegistryAuth("low", "2"), "b.example": RegistryAuth("low", "3")}
    assert merge_by_priority([high, low]) == {
        "a.example": RegistryAuth("high", "1"),
        "b.example": RegistryAuth("low", "3"),
    }


BAD_INPUT = [
    (
        "not a document",
        b"{not json: [",
        "document",
        "neither valid JSON (line 1, column 2) nor YAML (line 1, column 13)",
    ),
    (
        "a Secret's JSON broken on line 3",
        b'{"kind": "Secret", "type": "kubernetes.io/dockerconfigjson",\n'
        b'  "data": {".dockerconfigjson": "'
        + base64.b64encode(b'{"auths":\n{\n"r": 1,,}}')
        + b'"}}',
        ".dockerconfigjson",
        "not valid JSON (line 3, column 8)",
    ),
    ("a list", b"[1, 2]", "document", "expected a JSON or YAML object"),
    ("auths not a map", b'{"auths": []}', "auths", "expected a map"),
    ("entry not an object", b'{"auths": {"r.example": "x"}}', 'auths["r.example"]', "object"),
    ("bad base64", b'{"auths": {"r.example": {"auth": "%%%"}}}', ".auth", "base64"),
    (
        "auth without a colon",
        docker_config({"r.example": {"auth": b64("nocolon")}}),
        ".auth",
        "no ':'",
    ),
    ("empty host", b'{"auths": {"": {"username": "u", "password": "p"}}}', '[""]', "empty"),
    ("empty entry", b'{"auths": {"r.example": {}}}', 'auths["r.example"]', "no auth"),
    (
        "username without password",
        b'{"auths": {"r.example": {"username": "u"}}}',
        ".password",
        "missing",
    ),
    ("password not a string", b'{"auths": {"r.example": {"password": 1}}}', ".password", "string"),
    (
        "wrong Secret type",
        b'{"kind": "Secret", "type": "Opaque", "data": {}}',
        "type",
        "expected kubernetes.io/dockerconfigjson",
    ),
    (
        "Secret without the key",
        b'{"kind": "Secret", "type": "kubernetes.io/dockerconfigjson", "data": {}}',
        "data..dockerconfigjson",
        "missing",
    ),
    (
        "Secret data not base64",
        b'{"kind": "Secret", "type": "kubernetes.io/dockerconfigjson",'
        b' "data": {".dockerconfigjson": "!!"}}',
        "data..dockerconfigjson",
        "base64",
    ),
    ("not a Secret", b'{"kind": "ConfigMap", "data": {}}', "kind", "expected a Secret"),
    ("deep nesting", b"[" * 100000, "document", "neither valid JSON"),
]


@pytest.mark.parametrize(
    ("case", "raw", "field", "problem"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_is_one_clear_error_naming_source_and_field(
    case: str, raw: bytes, field: str, problem: str
) -> None:
    with pytest.raises(InvalidCredentials) as caught:
        parse_document("/etc/secret.json", raw)
    message = str(caught.value)
    assert message.startswith("/etc/secret.json")
    assert field in caught.value.field
    assert problem in message
    assert "\n" not in message


def test_errors_never_contain_credential_values() -> None:
    raw = docker_config(
        {"r.example": {"auth": b64(PASSWORD)}}  # no colon: an error about this very value
    )
    with pytest.raises(InvalidCredentials) as caught:
        parse_document("s", raw)
    assert PASSWORD not in str(caught.value)
    assert b64(PASSWORD) not in str(caught.value)


def test_credential_values_never_show_in_repr() -> None:
    assert PASSWORD not in repr(RegistryAuth("user", PASSWORD, "token"))


def test_missing_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidCredentials, match=r"nope\.json: path: no such file"):
        load_secret_file(tmp_path / "nope.json")


def test_mounted_secret_volume_directory(tmp_path: Path) -> None:
    # kubelet publishes Secret keys as symlinks into a ..data directory it swaps atomically.
    data = tmp_path / "..2026_11_25_12_00_00.1"
    data.mkdir()
    (data / ".dockerconfigjson").write_bytes(docker_config({"r.example": {"auth": b64("u:p")}}))
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / ".dockerconfigjson").symlink_to("..data/.dockerconfigjson")
    assert load_secret_file(tmp_path) == {"r.example": RegistryAuth("u", "p")}


def test_directory_without_a_docker_config_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidCredentials, match=r"no \.dockerconfigjson"):
        load_secret_file(tmp_path)


def test_fallback_sources_only_fill_gaps(tmp_path: Path) -> None:
    primary = tmp_path / "primary.json"
    primary.write_bytes(docker_config({"a.example": {"auth": b64("p:1")}}))
    fallback = tmp_path / "fallback.json"
    fallback.write_bytes(
        docker_config({"a.example": {"auth": b64("f:2")}, "b.example": {"auth": b64("f:3")}})
    )
    assert load_credentials([primary], [fallback]) == {
        "a.example": RegistryAuth("p", "1"),
        "b.example": RegistryAuth("f", "3"),
    }


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_what_kubectl_create_secret_docker_registry_prints_is_accepted_as_is() -> None:
    printed = subprocess.run(
        [
            "kubectl",
            "create",
            "secret",
            "docker-registry",
            "pull-secret",
            "--docker-server=https://registry.example.com:5000",
            "--docker-username=puller",
            f"--docker-password={PASSWORD}",
            "--docker-email=ops@example.com",
            "--dry-run=client",
            "-o",
            "yaml",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert parse_document("kubectl", printed) == {
        "registry.example.com:5000": RegistryAuth("puller", PASSWORD)
    }


@pytest.mark.parametrize(
    "key",
    ["https://reg.example\n/v2/", "reg.example:5000\n/x", "\u212aeg.example", "r\u0130.example"],
    ids=["newline before the path", "newline after the port", "KELVIN SIGN", "dotted capital I"],
)
def test_a_registry_key_that_is_no_plain_host_is_refused(key: str) -> None:
    """Found by: Secrets fuzz (RELIABILITY.md, "Bugs found")."""
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
    """Found by: Secrets fuzz (RELIABILITY.md, "Bugs found")."""
    with pytest.raises(InvalidCredentials, match="not valid base64"):
        parse_document("secret.json", document)
