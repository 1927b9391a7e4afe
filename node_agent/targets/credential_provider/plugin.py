"""The plugin executable the kubelet runs: a POSIX `sh` script (it runs on the host, which
may have no Python) that answers with the response file beside it (`RESPONSE_NAME`).

The kubelet runs it for each pull of a matching image, with a `CredentialProviderRequest` on
stdin, and reads the `CredentialProviderResponse` on stdout, of the request's apiVersion.
The script needs `sh` and `cat` only. It answers only with a complete response: the
response file is replaced by a rename, so a read sees one whole version, and the script
checks the shape the agent writes (`response.py`) before answering; a missing or foreign
file is a non-zero exit with one stderr line that quotes nothing from the file
(docs/node-facts.md#kubelet-credential-provider).

The response is found beside the script (the kubelet runs the plugin by its full path, so
`$0` names its directory): the same script answers when the node runs it and when the
agent, which sees the node under `--host-root`, runs it for `node-agent check`.
"""

import hashlib
from collections.abc import Mapping
from typing import Any, Final

from node_agent.credentials import Credentials
from node_agent.targets import Desired, Entry, FormatError

#: The executable's name in the kubelet's bin dir, and the provider's `name` in its config.
PLUGIN_NAME: Final = "node-agent-credential-provider"
#: The response file's name, in the plugin's directory.
RESPONSE_NAME: Final = f"{PLUGIN_NAME}.json"
#: The second line of every script the agent writes: how it knows the file is its own.
MARKER: Final = f"# {PLUGIN_NAME}: written by node-agent, which rewrites it; do not edit."

_SCRIPT: Final = r"""#!/bin/sh
{marker}
# The kubelet runs it for each pull of an image that its entry in the kubelet's
# CredentialProviderConfig matches: a CredentialProviderRequest on stdin, the
# CredentialProviderResponse on stdout. The answer is the response node-agent keeps beside
# it ({response}), for the request's apiVersion. Needs sh and cat only.
PATH=/usr/bin:/bin
newline='
'
head="{{$newline  \"apiVersion\": \"credentialprovider.kubelet.k8s.io/v1\","

fail() {{
	printf '{name}: %s\n' "$1" >&2
	exit 1
}}

case $0 in
*/*) response=${{0%/*}}/{response} ;;
*) fail 'run by a path (as the kubelet does), not looked up in PATH' ;;
esac
request=$(cat) || fail 'cannot read the request on stdin'
case $request in
*'"kind":"CredentialProviderRequest"'* | *'"kind": "CredentialProviderRequest"'*) ;;
*) fail 'stdin is not a CredentialProviderRequest' ;;
esac
version=
for candidate in v1 v1beta1 v1alpha1; do
	api="credentialprovider.kubelet.k8s.io/$candidate\""
	case $request in
	*"\"apiVersion\":\"$api"* | *"\"apiVersion\": \"$api"*)
		version=$candidate
		break
		;;
	esac
done
[ -n "$version" ] ||
	fail 'the request is not of credentialprovider.kubelet.k8s.io/v1, v1beta1 or v1alpha1'

answer=$(cat -- "$response" 2>/dev/null) ||
	fail "cannot read $response (node-agent --targets credential-provider writes it)"
case $answer in
"$head"*'"kind": "CredentialProviderResponse"'*"$newline}}") ;;
*) fail "$response is not a complete response (node-agent rewrites it on its next pass)" ;;
esac
if [ "$version" = v1 ]; then
	printf '%s\n' "$answer"
else
	api="credentialprovider.kubelet.k8s.io/$version"
	printf '{{\n  "apiVersion": "%s",%s\n' "$api" "${{answer#"$head"}}"
fi
"""


#: The script, in full.
PLUGIN_SCRIPT: Final = _SCRIPT.format(marker=MARKER, name=PLUGIN_NAME, response=RESPONSE_NAME)


class PluginFormat:
    """`NodeFileFormat` for the plugin executable. Its one entry is the script's digest: a
    script edited by hand, or written by an older agent, differs and is rewritten."""

    name = "credential-provider-plugin"

    script = PLUGIN_SCRIPT

    def desired_entries(
        self, credentials: Credentials, current: Mapping[str, Mapping[str, Any]]
    ) -> Desired:
        return Desired({PLUGIN_NAME: {"sha256": _digest(self.script)}})

    def entries(self, text: str | None) -> dict[str, dict[str, Any]]:
        if text is None:
            return {}
        if text.split("\n", 2)[1:2] != [MARKER]:
            raise FormatError(
                f"not a {PLUGIN_NAME} written by node-agent; refusing to replace it"
                " (another provider's executable under the same name?)"
            )
        return {PLUGIN_NAME: {"sha256": _digest(text)}}

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        if any(entry is None for entry in updates.values()):
            raise FormatError("the plugin is never removed by an edit")
        return self.script

    def redact(self, text: str) -> str:
        return text  # no credential in it: the response file holds them


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
