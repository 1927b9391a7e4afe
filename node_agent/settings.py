"""The agent's effective configuration, built by `node_agent.cli` from flags and
`NODE_AGENT_*` environment variables."""

from dataclasses import dataclass
from pathlib import Path

TARGET_NAMES = ("containerd", "kubelet")
RELOAD_MODES = ("none", "command", "systemd")


@dataclass(frozen=True)
class Settings:
    """Everything one reconcile needs to know. Node paths are as seen on the node; use
    `on_host` to get the path inside a container that mounts the node at `host_root`."""

    secret_files: tuple[Path, ...] = ()
    """Credential sources in priority order (documents, Secret manifests, Secret volumes)."""

    fallback_secret_files: tuple[Path, ...] = ()
    """Sources used only for registries no `secret_files` source names."""

    containerd_config: Path = Path("/etc/containerd/config.toml")
    """containerd's config.toml on the node."""

    containerd_config_version: int = 2
    """`version` written when config.toml has to be created (2 or 3)."""

    kubelet_config: Path = Path("/var/lib/kubelet/config.json")
    """The kubelet's docker config file on the node."""

    targets: tuple[str, ...] = TARGET_NAMES
    """Which node files to manage."""

    host_root: Path = Path("/")
    """Where the node's filesystem is mounted; prefixes every node path."""

    state_dir: Path = Path("/var/lib/node-agent")
    """Where the agent remembers what it owns (must survive pod restarts: a hostPath)."""

    reload: str = "systemd"
    """How to restart containerd: none, command or systemd (D-Bus RestartUnit)."""

    reload_command: tuple[str, ...] = ()
    """argv of the restart command for reload=command."""

    reload_timeout: float = 30.0
    """Seconds to wait for the restart and for CRI to answer before rolling back."""

    containerd_socket: Path = Path("/run/containerd/containerd.sock")
    """containerd's gRPC socket, asked for CRI Version after a restart."""

    system_bus_socket: Path = Path("/run/dbus/system_bus_socket")
    """The node's system D-Bus socket, for reload=systemd."""

    dry_run: bool = False
    """Show what would change (credentials redacted); write and restart nothing."""

    log_format: str = "text"
    """text or json."""

    log_level: str = "info"
    """debug, info, warning or error."""

    def on_host(self, node_path: Path) -> Path:
        """`node_path` as reachable from here (under `host_root`)."""
        return self.host_root / node_path.relative_to(node_path.anchor)
