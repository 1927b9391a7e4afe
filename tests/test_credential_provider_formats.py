"""The credential provider's three files as pure formats: the response, the plugin script and
the agent's entry in the kubelet's CredentialProviderConfig."""

import json

import pytest
from support.kubelet_credential_provider import config_errors, response_errors

from node_agent.credentials import Credentials, RegistryAuth
from node_agent.targets import FormatError
from node_agent.targets.credential_provider import (
    PLUGIN_NAME,
    PLUGIN_SCRIPT,
    PluginFormat,
    ProviderConfigFormat,
    ResponseFormat,
)
from node_agent.targets.credential_provider.response import valid_cache_duration

V1 = "credentialprovider.kubelet.k8s.io/v1"
CREDENTIALS = {
    "r.example.com": RegistryAuth("puller", "pw-1"),
    "docker.io": RegistryAuth("hubuser", "hub-pw"),
    "*.corp.example": RegistryAuth("corp", "corp-pw"),
    "mirror.example:5000": RegistryAuth("m", "m-pw"),
    "token.example": RegistryAuth(identitytoken="tok"),
}

EKS_CONFIG = """\
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  # ECR, installed by the node image
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "*.dkr.ecr.*.amazonaws.com.cn"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: node-profile   # kept as it is

# trailing comment of the file
"""


def fresh(
    text_format: ResponseFormat | ProviderConfigFormat, credentials: Credentials = CREDENTIALS
) -> str:
    desired = text_format.desired_entries(credentials, {})
    return text_format.render(None, desired.entries)


# The response


def test_the_response_serves_every_registry_with_a_username_and_password() -> None:
    response = json.loads(fresh(ResponseFormat()))
    assert response["auth"] == {
        "*.corp.example": {"username": "corp", "password": "corp-pw"},
        "docker.io": {"username": "hubuser", "password": "hub-pw"},
        "mirror.example:5000": {"username": "m", "password": "m-pw"},
        "r.example.com": {"username": "puller", "password": "pw-1"},
    }
    assert response_errors(fresh(ResponseFormat()).encode(), api_version=V1) == []


def test_an_identity_token_only_registry_is_skipped_with_a_reason() -> None:
    desired = ResponseFormat().desired_entries(CREDENTIALS, {})
    assert "token.example" not in desired.entries
    assert desired.skipped == (
        "token.example: skipped: the kubelet's credential providers pass only username and "
        "password",
    )


def test_the_response_is_never_cached_by_default_and_takes_the_configured_duration() -> None:
    assert json.loads(fresh(ResponseFormat()))["cacheDuration"] == "0s"
    response = json.loads(fresh(ResponseFormat(cache_duration="90s")))
    assert response["cacheDuration"] == "90s"
    assert response["cacheKeyType"] == "Registry"


def test_a_new_cache_duration_rewrites_a_response_whose_entries_are_unchanged() -> None:
    before = fresh(ResponseFormat())
    after = ResponseFormat(cache_duration="5m").render(before, {})
    assert json.loads(after)["cacheDuration"] == "5m"
    assert json.loads(after)["auth"] == json.loads(before)["auth"]


def test_the_layout_the_plugin_checks_is_kept_whatever_the_values() -> None:
    awkward = {"r.example.com": RegistryAuth('u"\n}', "p\\\n}\u00e9\u2028")}
    text = fresh(ResponseFormat(), awkward)
    lines = text.split("\n")
    assert lines[1] == '  "apiVersion": "credentialprovider.kubelet.k8s.io/v1",'
    assert lines[-2:] == ["}", ""]
    assert text.isascii()
    assert json.loads(text)["auth"]["r.example.com"] == {
        "username": 'u"\n}',
        "password": "p\\\n}\u00e9\u2028",
    }


def test_an_unreadable_response_is_rewritten_whole_and_never_shown() -> None:
    response = ResponseFormat()
    assert response.entries('{"auth": {"r.example.com": {"password": "torn') == {}
    desired = response.desired_entries(CREDENTIALS, {})
    rewritten = response.render("garbage pw-1", desired.entries)
    assert json.loads(rewritten)["auth"]["r.example.com"]["password"] == "pw-1"
    assert "pw-1" not in response.redact('{"kind": "x", "pw": "pw-1"}')


def test_the_response_diff_shows_no_credential() -> None:
    redacted = ResponseFormat().redact(fresh(ResponseFormat()))
    assert "pw-1" not in redacted and "puller" not in redacted
    assert json.loads(redacted)["auth"]["r.example.com"] == {
        "username": "***",
        "password": "***",
    }


@pytest.mark.parametrize("duration", ["0s", "0", "30s", "5m", "1h30m", "250ms", "1.5h"])
def test_cache_durations_the_kubelet_parses_are_accepted(duration: str) -> None:
    assert valid_cache_duration(duration)


@pytest.mark.parametrize("duration", ["", "5", "-1s", "5 m", "1d", "s", "5m "])
def test_cache_durations_the_kubelet_cannot_parse_are_refused(duration: str) -> None:
    assert not valid_cache_duration(duration)
    with pytest.raises(ValueError, match="cache_duration"):
        ResponseFormat(cache_duration=duration)


# The plugin


def test_the_plugin_is_one_entry_the_script_digest() -> None:
    plugin = PluginFormat()
    desired = plugin.desired_entries({}, {})
    assert plugin.entries(PLUGIN_SCRIPT) == desired.entries
    assert plugin.render(None, desired.entries) == PLUGIN_SCRIPT


def test_a_plugin_script_edited_by_hand_differs_and_is_rewritten() -> None:
    plugin = PluginFormat()
    edited = PLUGIN_SCRIPT.replace("exit 1", "exit 0")
    assert plugin.entries(edited) != plugin.desired_entries({}, {}).entries
    assert plugin.render(edited, plugin.desired_entries({}, {}).entries) == PLUGIN_SCRIPT


def test_another_executable_under_the_plugin_name_is_refused() -> None:
    with pytest.raises(FormatError, match="not a node-agent-credential-provider written"):
        PluginFormat().entries("#!/bin/sh\necho '{}'\n")


# The CredentialProviderConfig


def test_a_new_config_holds_only_the_agent_provider_and_the_kubelet_accepts_it() -> None:
    text = fresh(ProviderConfigFormat())
    assert config_errors(text) == []
    assert ProviderConfigFormat().entries(text) == {
        PLUGIN_NAME: {
            "name": PLUGIN_NAME,
            "matchImages": [
                "*.corp.example",
                "docker.io",
                "mirror.example:5000",
                "r.example.com",
                "token.example",
            ],
            "defaultCacheDuration": "0s",
            "apiVersion": V1,
        }
    }


def test_adding_the_agent_provider_keeps_every_other_byte_of_an_existing_config() -> None:
    config = ProviderConfigFormat()
    desired = config.desired_entries(CREDENTIALS, config.entries(EKS_CONFIG))
    merged = config.render(EKS_CONFIG, desired.entries)
    assert config_errors(merged) == []
    ecr_block_end = EKS_CONFIG.index("\n# trailing")
    assert merged.startswith(EKS_CONFIG[:ecr_block_end])
    assert merged.endswith(EKS_CONFIG[ecr_block_end:])
    assert list(config.entries(merged)) == ["ecr-credential-provider", PLUGIN_NAME]


def test_updating_and_removing_the_agent_provider_gives_the_original_bytes_back() -> None:
    config = ProviderConfigFormat()
    first = config.render(EKS_CONFIG, config.desired_entries(CREDENTIALS, {}).entries)
    fewer = {"r.example.com": RegistryAuth("puller", "pw-2")}
    second = config.render(first, config.desired_entries(fewer, config.entries(first)).entries)
    assert config.entries(second)[PLUGIN_NAME]["matchImages"] == ["r.example.com"]
    assert config.entries(second)["ecr-credential-provider"] == config.entries(EKS_CONFIG)[
        "ecr-credential-provider"
    ]
    assert config.render(second, {PLUGIN_NAME: None}) == EKS_CONFIG


def test_a_json_config_stays_json_with_the_other_provider_byte_for_byte() -> None:
    other = (
        '{"name": "gcp", "matchImages": ["*.pkg.dev"], "defaultCacheDuration": "1m",'
        ' "apiVersion": "credentialprovider.kubelet.k8s.io/v1"}'
    )
    text = (
        '{\n  "apiVersion": "kubelet.config.k8s.io/v1",\n  "kind": "CredentialProviderConfig",\n'
        f'  "providers": [\n    {other}\n  ]\n}}\n'
    )
    config = ProviderConfigFormat()
    merged = config.render(text, config.desired_entries(CREDENTIALS, {}).entries)
    assert [p["name"] for p in json.loads(merged)["providers"]] == ["gcp", PLUGIN_NAME]
    assert other in merged
    assert config_errors(merged) == []
    assert config.render(merged, {PLUGIN_NAME: None}) == text


def test_a_compact_block_list_gets_the_new_provider_at_its_own_indent() -> None:
    text = (
        "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n"
        "- name: other\n  matchImages: [a.example]\n  defaultCacheDuration: 1m\n"
        f"  apiVersion: {V1}\nextra: kept\n"
    )
    config = ProviderConfigFormat()
    merged = config.render(text, config.desired_entries(CREDENTIALS, {}).entries)
    assert config_errors(merged) == []
    assert merged.startswith(text[: text.index("extra:")])
    assert merged.endswith("extra: kept\n")
    assert f"- name: {json.dumps(PLUGIN_NAME)}\n  matchImages:" in merged


def test_with_no_registry_to_serve_the_agent_entry_is_kept_for_the_kubelet_to_start() -> None:
    config = ProviderConfigFormat()
    text = fresh(config)
    desired = config.desired_entries({}, config.entries(text))
    assert desired.entries == {PLUGIN_NAME: config.entries(text)[PLUGIN_NAME]}
    assert config.desired_entries({}, {}).entries == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("providers: [", r"neither valid YAML nor JSON \(line 1, column 13\)"),
        ("kind: KubeletConfiguration\n", "not a CredentialProviderConfig"),
        (
            "apiVersion: kubelet.config.k8s.io/v2\nkind: CredentialProviderConfig\nproviders: []\n",
            "apiVersion is none of",
        ),
        (
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\n",
            "providers is not a list",
        ),
        (
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\n"
            "providers:\n  - name: a\n  - name: a\n",
            r"providers\[1\].name is a duplicate",
        ),
    ],
)
def test_a_config_the_agent_cannot_edit_safely_is_refused_naming_the_field(
    text: str, problem: str
) -> None:
    with pytest.raises(FormatError, match=problem):
        ProviderConfigFormat().entries(text)


def test_other_providers_args_and_env_values_never_show_in_a_diff() -> None:
    redacted = ProviderConfigFormat().redact(EKS_CONFIG)
    assert "node-profile" not in redacted and "get-credentials" not in redacted
    assert "AWS_PROFILE" in redacted and "ecr-credential-provider" in redacted


def test_matching_all_images_covers_hosts_by_label_count_and_names_port_registries() -> None:
    config = ProviderConfigFormat(match_all=True)
    entry = config.desired_entries(CREDENTIALS, {}).entries[PLUGIN_NAME]
    assert entry["matchImages"] == [
        "*",
        "*.*",
        "*.*.*",
        "*.*.*.*",
        "*.*.*.*.*",
        "*.*.*.*.*.*",
        "mirror.example:5000",
    ]
    assert config_errors(fresh(config)) == []


def test_matching_all_images_the_entry_does_not_change_when_a_portless_registry_comes() -> None:
    config = ProviderConfigFormat(match_all=True)
    before = config.desired_entries({}, {}).entries
    after = config.desired_entries({"new.example.org": RegistryAuth("u", "p")}, {}).entries
    assert before == after
    assert config.desired_entries({}, {}).registries == 0
