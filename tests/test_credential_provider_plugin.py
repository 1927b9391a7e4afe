"""The plugin as the kubelet runs it: the real script, executed by its path (so by the node's
`/bin/sh`, dash here), a CredentialProviderRequest on stdin, an empty environment; its
answer checked field by field as the kubelet reads it."""

import json
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.kubelet_credential_provider import request, response_errors, run_plugin

from node_agent.credentials import Credentials, RegistryAuth
from node_agent.settings import Settings
from node_agent.targets.credential_provider import (
    PLUGIN_NAME,
    PLUGIN_SCRIPT,
    RESPONSE_NAME,
    ResponseFormat,
)
from node_agent.wiring import build_reconciler

API_VERSIONS = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
]
PASSWORD = "s3cret-pw"
CREDENTIALS = {
    "r.example.com": RegistryAuth("puller", PASSWORD),
    "docker.io": RegistryAuth("hub", "hub-pw"),
}


def response_text(credentials: Credentials) -> str:
    response = ResponseFormat()
    return response.render(None, response.desired_entries(credentials, {}).entries)


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    """The plugin and its response in a bin dir, as the agent leaves them."""
    bin_dir = tmp_path / "bin dir"  # a space: the script quotes its paths
    bin_dir.mkdir()
    script = bin_dir / PLUGIN_NAME
    script.write_text(PLUGIN_SCRIPT)
    script.chmod(0o755)
    (bin_dir / RESPONSE_NAME).write_text(response_text(CREDENTIALS))
    return script


def test_the_node_shell_is_dash() -> None:
    # What "needs only POSIX sh" is tested against: Debian's /bin/sh.
    assert os.path.realpath("/bin/sh").endswith("dash")


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_the_answer_is_a_response_of_the_request_api_version(
    plugin: Path, api_version: str
) -> None:
    result = run_plugin(plugin, request("r.example.com/team/app:1", api_version))
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert response_errors(result.stdout, api_version=api_version) == []
    answer = json.loads(result.stdout)
    assert answer["cacheKeyType"] == "Registry" and answer["cacheDuration"] == "0s"
    assert answer["auth"] == {
        "docker.io": {"username": "hub", "password": "hub-pw"},
        "r.example.com": {"username": "puller", "password": PASSWORD},
    }


def test_a_request_pretty_printed_by_a_person_is_answered(plugin: Path) -> None:
    body = json.dumps(json.loads(request("r.example.com/app")), indent=2).encode()
    result = run_plugin(plugin, body)
    assert result.returncode == 0
    assert response_errors(result.stdout, api_version=API_VERSIONS[0]) == []


@pytest.mark.parametrize(
    ("stdin", "says"),
    [
        (b"", b"stdin is not a CredentialProviderRequest"),
        (b'{"kind":"Pod"}', b"stdin is not a CredentialProviderRequest"),
        (
            request("r.example.com/app", "credentialprovider.kubelet.k8s.io/v2"),
            b"the request is not of credentialprovider.kubelet.k8s.io/v1, v1beta1 or v1alpha1",
        ),
    ],
)
def test_a_request_it_cannot_answer_is_a_failure_with_one_line(
    plugin: Path, stdin: bytes, says: bytes
) -> None:
    result = run_plugin(plugin, stdin)
    assert result.returncode != 0 and result.stdout == b""
    assert result.stderr == b"node-agent-credential-provider: " + says + b"\n"


def test_a_missing_response_is_a_failure_that_says_who_writes_it(plugin: Path) -> None:
    (plugin.parent / RESPONSE_NAME).unlink()
    result = run_plugin(plugin, request("r.example.com/app"))
    assert result.returncode != 0 and result.stdout == b""
    assert result.stderr.count(b"\n") == 1
    assert b"node-agent --targets credential-provider writes it" in result.stderr


def test_no_torn_response_ever_reaches_the_kubelet(plugin: Path) -> None:
    """Every prefix of a response (a write cut short, a disk full) is refused, and says so
    without quoting it; only the whole response (its final newline aside) is answered."""
    whole = response_text(CREDENTIALS).encode()
    response = plugin.parent / RESPONSE_NAME
    answered = []
    for length in range(len(whole)):
        response.write_bytes(whole[:length])
        result = run_plugin(plugin, request("r.example.com/app"))
        if result.returncode == 0:
            answered.append(length)
            assert json.loads(result.stdout) == json.loads(whole)
            continue
        assert result.stdout == b""
        assert result.stderr.count(b"\n") == 1 and b"not a complete response" in result.stderr
        assert PASSWORD.encode() not in result.stderr
    assert answered == [len(whole) - 1]


def test_a_foreign_file_in_place_of_the_response_is_refused_unquoted(plugin: Path) -> None:
    (plugin.parent / RESPONSE_NAME).write_text(f'{{"auths": {{"x": "{PASSWORD}"}}}}\n')
    result = run_plugin(plugin, request("r.example.com/app"))
    assert result.returncode != 0 and result.stdout == b""
    assert PASSWORD.encode() not in result.stderr


def test_a_thousand_concurrent_pulls_while_the_agent_rewrites_get_old_or_new_whole(
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    settings = Settings(
        host_root=Path("/"),
        targets=("credential-provider",),
        credential_provider_bin_dir=bin_dir,
        credential_provider_config=tmp_path / "provider-config.yaml",
        state_dir=tmp_path / "state",
        restart_mode="none",
    )
    reconciler = build_reconciler(settings)
    old = {"r.example.com": RegistryAuth("puller", "old-password")}
    new = {"r.example.com": RegistryAuth("puller", "new-password")}
    reconciler.reconcile(old)
    stop = threading.Event()
    rewrites = Counter[str]()

    def rotate() -> None:
        while not stop.is_set():
            for credentials in (new, old):
                reconciler.reconcile(credentials)
                rewrites["done"] += 1

    rotator = threading.Thread(target=rotate)
    rotator.start()
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(
                pool.map(
                    lambda _: run_plugin(bin_dir / PLUGIN_NAME, request("r.example.com/app")),
                    range(1000),
                )
            )
    finally:
        stop.set()
        rotator.join()
    passwords = Counter[str]()
    for result in results:
        assert result.returncode == 0, result.stderr
        assert response_errors(result.stdout, api_version=API_VERSIONS[0]) == []
        passwords[json.loads(result.stdout)["auth"]["r.example.com"]["password"]] += 1
    assert set(passwords) <= {"old-password", "new-password"}
    assert rewrites["done"] > 10  # the file really was being replaced meanwhile
    assert sum(passwords.values()) == 1000
