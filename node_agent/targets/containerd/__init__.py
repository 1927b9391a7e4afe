"""containerd's `/etc/containerd/config.toml`, registry auth tables only (`format.py` has
the whole story). Pure."""

from node_agent.targets.containerd.format import DOCKER_HUB_HOST, ContainerdFormat, ParsedTexts
from node_agent.targets.containerd.reading import CREDENTIAL_FIELDS, PLUGIN_BY_VERSION

__all__ = [
    "CREDENTIAL_FIELDS",
    "DOCKER_HUB_HOST",
    "PLUGIN_BY_VERSION",
    "ContainerdFormat",
    "ParsedTexts",
]
