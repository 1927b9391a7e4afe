"""The kubelet's image credential provider: three files, each a pure `NodeFileFormat`.

- `response.py`: the `CredentialProviderResponse` the agent keeps up to date (the
  credentials, 0600), beside the plugin;
- `plugin.py`: the executable the kubelet runs for every pull of a matching image: a POSIX
  `sh` script that answers with that response;
- `provider_config.py`: the agent's provider entry in the kubelet's
  `CredentialProviderConfig`, beside any other providers, which are never touched.

The kubelet asks the plugin on every pull (with `cacheDuration: "0s"` it caches nothing),
so a new response reaches the very next pull, with no restart of anything. Only a change of
the provider entry (the registries it matches) waits for the kubelet's next start
(docs/node-facts.md#kubelet-credential-provider).
"""

from node_agent.targets.credential_provider.plugin import (
    PLUGIN_NAME,
    PLUGIN_SCRIPT,
    RESPONSE_NAME,
    PluginFormat,
)
from node_agent.targets.credential_provider.provider_config import ProviderConfigFormat
from node_agent.targets.credential_provider.response import ResponseFormat

__all__ = [
    "PLUGIN_NAME",
    "PLUGIN_SCRIPT",
    "RESPONSE_NAME",
    "PluginFormat",
    "ProviderConfigFormat",
    "ResponseFormat",
]
