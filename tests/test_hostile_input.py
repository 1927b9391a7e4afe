"""What a hostile or careless Secret cannot do through the command line: brick containerd,
leak a password, forge a log line, crash with a traceback, or be half-applied silently.

Each case reproduces a finding of a security review against a temp node tree
(`--host-root`, `--reload none`); the daemon's side of the same inputs is in
tests/test_daemon.py ("hostile input").
"""

import json
import logging
import tomllib
from pathlib import Path

import pytest
from support.dockerconfig import docker_config

from node_agent.cli import main
from node_agent.credentials import parse_document
from node_agent.errors import InvalidCredentials
from node_agent.escaping import (
    bounded,
    printable,
    shown_key,
    without_url_userinfo,
    without_userinfo,
)
from node_agent.kube.client import KubeApi
from node_agent.kube.errors import ApiError
from node_agent.kube.model import ObjectRef
from node_agent.logs import JsonFormatter, TextFormatter
from node_agent.targets.containerd import ContainerdFormat
from node_agent.targets.kubelet import KubeletFormat

CRI = "io.containerd.grpc.v1.cri"
PASSWORD = "Sup3rS3cretPW"
ENTRY = {"username": "puller", "password": PASSWORD}


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "var/lib/kubelet").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    return root


def reconcile(host: Path, tmp_path: Path, auths: object, *extra: str) -> int:
    secret = tmp_path / "secret.json"
    secret.write_bytes(docker_config(auths))
    flags = ["--secret-file", str(secret), "--host-root", str(host), "--reload", "none"]
    return main(["reconcile", *flags, *extra], environ={})


def node_files(host: Path) -> tuple[str, str | None]:
    kubelet = host / "var/lib/kubelet/config.json"
    config_toml = (host / "etc/containerd/config.toml").read_text()
    return config_toml, kubelet.read_text() if kubelet.exists() else None


# IPv6 registry keys: containerd 1.6/1.7 cannot load them from a table header


@pytest.mark.parametrize("key", ["[::1]:5000", "[fd00::10]:443", "https://[::1]:5000/v2/"])
def test_an_ipv6_registry_is_skipped_for_containerd_with_a_warning_and_given_to_kubelet(
    host: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert reconcile(host, tmp_path, {key: ENTRY}) == 0
    config_toml, config_json = node_files(host)
    assert config_toml == "version = 2\n"
    assert config_json is not None
    registry = key.removeprefix("https://").removesuffix("/v2/")
    assert registry in json.loads(config_json)["auths"]
    err = capsys.readouterr().err
    assert f"containerd: {registry}: skipped: containerd 1.6/1.7 cannot load an IPv6" in err


# Wildcards and ports: what the README says


@pytest.mark.parametrize("key", ["*.example.com", "*", "*.*"])
def test_a_wildcard_is_skipped_for_containerd_with_a_warning_and_given_to_kubelet(
    host: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert reconcile(host, tmp_path, {key: ENTRY}) == 0
    config_toml, config_json = node_files(host)
    assert "*" not in config_toml
    assert config_json is not None and key in json.loads(config_json)["auths"]
    assert f"containerd: {key}: skipped: containerd looks credentials up by exact host" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_a_port_out_of_range_is_invalid_and_nothing_changes(
    host: Path, tmp_path: Path, port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = node_files(host)
    assert reconcile(host, tmp_path, {f"reg.example:{port}": ENTRY}) == 1
    assert node_files(host) == before
    assert f'auths["reg.example:{port}"]: port out of range (1-65535)' in capsys.readouterr().err


# A password inside a registry key is never echoed


KEYS_WITH_PASSWORDS = [
    f"https://puller:{PASSWORD}@reg.example.com/v2/",
    f"puller:{PASSWORD}@reg.example.com",
    f"https://puller:{PASSWORD}/with/slashes@reg.example.com",
]


@pytest.mark.parametrize("key", KEYS_WITH_PASSWORDS)
def test_a_registry_key_holding_a_password_is_refused_without_showing_it(
    host: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = node_files(host)
    assert reconcile(host, tmp_path, {key: ENTRY}, "--log-format", "json") == 1
    assert node_files(host) == before
    err = capsys.readouterr().err
    assert PASSWORD not in err
    assert "***@" in err and err.count("\n") == 1


def test_a_duplicate_registry_names_the_first_spelling_without_its_password() -> None:
    document = {
        "auths": {
            f"https://u:{PASSWORD}@reg.example/": {"auth": "dTpw"},
            "reg.example": {"auth": "djp3"},
        }
    }
    with pytest.raises(InvalidCredentials) as refused:
        parse_document("s", json.dumps(document).encode())
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        (f"https://puller:{PASSWORD}@reg.example.com/v2/", "https://***@reg.example.com/v2/"),
        (f"puller:{PASSWORD}@reg.example.com", "***@reg.example.com"),
        ("reg.example.com", "reg.example.com"),
        ("reg.example\n/v2/", "reg.example\\n/v2/"),
        ("x" * 300, "x" * 119 + "…"),
    ],
)
def test_how_a_registry_key_is_shown(key: str, shown: str) -> None:
    assert shown_key(key) == shown


def test_without_userinfo_keeps_keys_without_it() -> None:
    assert without_userinfo("https://reg.example/v2/") == "https://reg.example/v2/"


# A lone surrogate is invalid input, not a traceback


@pytest.mark.parametrize("field", ["username", "password", "identitytoken", "auth"])
def test_a_lone_surrogate_is_invalid_input_naming_the_field(
    host: Path, tmp_path: Path, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret.json"
    entry = {"username": "u", "password": "p", field: "\ud800x"}
    secret.write_text(json.dumps({"auths": {"reg.example": entry}}))  # ensure_ascii: valid JSON
    before = node_files(host)
    flags = ["--secret-file", str(secret), "--host-root", str(host), "--reload", "none"]
    assert main(["reconcile", *flags], environ={}) == 1
    assert node_files(host) == before
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f'auths["reg.example"].{field}: not valid Unicode text (a lone surrogate)' in err


# Control characters cannot forge lines


@pytest.mark.parametrize(
    "key", ["reg.example\nnode-agent: fine\n/v2/", "reg.example\r/v2/", "reg\x1b[2J.example"]
)
def test_control_characters_in_a_key_are_escaped_in_the_one_error_line(
    host: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert reconcile(host, tmp_path, {key: ENTRY}) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err and "\x1b" not in err
    assert printable(shown_key(key)) in err


@pytest.mark.parametrize(
    ("text", "limit", "shown"),
    [
        ("short enough", 12, "short enough"),
        ("cut at the last word that fits in", 32, "cut at the …(23 more characters)"),
        ("trailing   spaces   go" + "x" * 20, 34, "trailing …(34 more characters)"),
        ("one-very-long-word-without-spaces", 32, "one-very-l …(23 more characters)"),
        ("a " + "x" * 30, 31, "a xxxxxxx …(23 more characters)"),  # no space in the 2nd half
    ],
)
def test_long_text_is_cut_at_a_word_saying_how_much_was_left_out(
    text: str, limit: int, shown: str
) -> None:
    assert bounded(text, limit) == shown
    assert len(shown) <= limit


def test_text_log_lines_escape_control_characters() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "key %s", ("a\nb\u2028c",), None)
    line = TextFormatter().format(record)
    assert line.endswith("x: key a\\nb\\u2028c") and "\n" not in line


def test_json_log_lines_stay_one_line() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "key %s", ("a\nb",), None)
    assert "\n" not in JsonFormatter().format(record)


# --dry-run shows no credential, in changed lines or in context


def test_dry_run_redacts_header_values_and_secret_looking_keys_in_context_lines(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (host / "etc/containerd/config.toml").write_text(
        "version = 2\n"
        f'[plugins."{CRI}".registry.configs."other.example".auth]\n'
        '  username = "SECRET-USER"\n'
        f'[plugins."{CRI}".registry.configs."other.example".tls]\n'
        '  key_passphrase = "SECRET-PASSPHRASE"\n'
        f'[plugins."{CRI}".registry.headers]\n'
        '  Authorization = ["Basic SEADER-SECRET"]\n'
        '  X-Meta = ["SECRET-META"]\n'
        '[plugins."io.containerd.tracing.processor.v1.otlp"]\n'
        '  api_token = "SECRET-TOKEN"\n'
    )
    (host / "var/lib/kubelet/config.json").write_text(
        json.dumps(
            {
                "auths": {f"https://u:{PASSWORD}@other.example": {"auth": "dTpw"}},
                "HttpHeaders": {"Authorization": "Bearer SECRET-BEARER"},
                "credHelpers": {"gcr.io": "gcloud"},
                "proxies": {"default": {"httpProxy": "http://proxy"}},
                "oauth_client_secret": "SECRET-CLIENT",
            }
        )
    )
    assert reconcile(host, tmp_path, {"reg.example": ENTRY}, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "SECRET" not in out and PASSWORD not in out and "puller" not in out
    assert "Authorization = [\"***\"]" in out and '"gcloud"' in out
    assert "http://proxy" in out


@pytest.mark.parametrize("file_format", [ContainerdFormat(), KubeletFormat()])
def test_redacting_twice_is_redacting_once(file_format: ContainerdFormat | KubeletFormat) -> None:
    text = (
        f'version = 2\n[plugins."{CRI}".registry.headers]\n  Authorization = ["Basic x"]\n'
        if isinstance(file_format, ContainerdFormat)
        else '{"auths": {"r": {"auth": "dTpw"}}, "HttpHeaders": {"A": "b"}}\n'
    )
    once = file_format.redact(text)
    assert file_format.redact(once) == once
    if isinstance(file_format, ContainerdFormat):
        assert tomllib.loads(once)["plugins"][CRI]["registry"]["headers"] == {
            "Authorization": ["***"]
        }


# Secrets that are probably mistakes


@pytest.mark.parametrize(
    ("document", "said"),
    [
        (b'{"auth": {"reg.example": {"auth": "dTpw"}}}', '["auth"]: not a registry: did you mean'),
        (b'{"Auths": {"reg.example": {"auth": "dTpw"}}}', '["Auths"]: not a registry: did you'),
        (
            b'{"kind": "Secret", "type": "kubernetes.io/dockerconfigjson", "stringData": '
            b'{".dockerconfigjson": "{\\"auth\\": {}}"}}',
            'auths: missing (found "auth": did you mean "auths"?)',
        ),
    ],
    ids=["auth", "Auths", "a Secret's auth"],
)
def test_a_misspelt_auths_is_invalid_with_a_did_you_mean(document: bytes, said: str) -> None:
    with pytest.raises(InvalidCredentials) as refused:
        parse_document("s", document)
    assert said in str(refused.value)


@pytest.mark.parametrize("document", [{"auths": {}}, {}], ids=["empty auths", "empty document"])
def test_credentials_that_name_no_registry_are_honoured_with_a_warning(
    host: Path, tmp_path: Path, document: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    assert reconcile(host, tmp_path, {"reg.example": ENTRY}) == 0
    capsys.readouterr()
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(document))
    flags = ["--secret-file", str(secret), "--host-root", str(host), "--reload", "none"]
    assert main(["reconcile", *flags], environ={}) == 0
    assert node_files(host)[0] == "version = 2\n"
    assert "the credentials name no registry: 2 entries the agent manages are removed" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:s3cret@127.0.0.1:1/api", "http://***@127.0.0.1:1/api"),
        ("url=https://a:b@h:6443/x (https://c@h2)", "url=https://***@h:6443/x (https://***@h2)"),
        ("https://api.example:6443/api/v1", "https://api.example:6443/api/v1"),
    ],
)
def test_urls_in_text_lose_their_user_and_password(text: str, shown: str) -> None:
    assert without_url_userinfo(text) == shown


def test_a_kubeconfig_server_with_a_password_never_shows_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreachable API server named with `user:password@` in the kubeconfig: neither the
    start-up log line nor the error says the password."""
    kubeconfig = tmp_path / "kubeconfig"
    cluster = {"server": "http://puller:s3cret-pw@127.0.0.1:1"}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    kubeconfig.write_text(json.dumps(config))
    with caplog.at_level(logging.DEBUG):
        api = KubeApi.connect(kubeconfig=kubeconfig, environ={})
        with pytest.raises(ApiError) as raised:
            api.list_secret(ObjectRef("ns", "name"), request_timeout=(1, 1))
        api.close()
    assert "Kubernetes API: kubeconfig" in caplog.text
    assert "s3cret-pw" not in str(raised.value) + caplog.text
    assert "127.0.0.1" in str(raised.value)
