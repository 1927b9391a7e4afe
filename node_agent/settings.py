"""The agent's effective configuration, built by `node_agent.cli` from flags and
`NODE_AGENT_*` environment variables."""

from dataclasses import dataclass, field
from pathlib import Path

from node_agent.kube.model import ObjectRef

TARGET_NAMES = ("containerd", "kubelet", "credential-provider")
DEFAULT_TARGETS = ("containerd", "kubelet")
RESTART_MODES = ("none", "command", "systemd", "trigger")
ON_SECRET_DELETE = ("remove", "keep")


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

    credential_provider_bin_dir: Path = Path("/etc/kubernetes/image-credential-provider")
    """The kubelet's `--image-credential-provider-bin-dir`: where the plugin goes."""

    credential_provider_config: Path = Path("/etc/kubernetes/image-credential-provider/config.yaml")
    """The kubelet's `--image-credential-provider-config`: the agent keeps its entry there.
    Beside the plugin by default (as EKS has it), so one directory holds all three files."""

    credential_provider_cache_duration: str = "0s"

    credential_provider_match_images: str = "registries"
    """The provider's `matchImages`: the credentials' registries, or all images ("all": the
    kubelet's config then never changes when a registry is added)."""
    """How long the kubelet may keep the plugin's answer ("0s": never, ask on every pull)."""

    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Which node files to manage."""

    host_root: Path = Path("/")
    """Where the node's filesystem is mounted; prefixes every node path."""

    state_dir: Path = Path("/var/lib/node-agent")
    """Where the agent remembers what it owns (must survive pod restarts: a hostPath)."""

    restart_mode: str = "systemd"
    """How to restart containerd: none, command, systemd (D-Bus RestartUnit) or trigger (a
    request to a systemd path unit on the node, through `restart_trigger_dir`)."""

    restart_command: tuple[str, ...] = ()
    """argv of the restart command for restart_mode=command."""

    restart_timeout: float = 30.0
    """Seconds to wait for the restart and for CRI to answer before rolling back."""

    containerd_socket: Path = Path("/run/containerd/containerd.sock")
    """containerd's gRPC socket, asked for CRI Version after a restart."""

    system_bus_socket: Path = Path("/run/dbus/system_bus_socket")
    """The node's system D-Bus socket, for restart_mode=systemd."""

    restart_trigger_dir: Path = Path("/run/node-agent")
    """The node directory shared with the host's restart unit, for restart_mode=trigger."""

    dry_run: bool = False
    """Show what would change (credentials redacted); write and restart nothing."""

    log_format: str = "text"
    """text or json."""

    log_level: str = "info"
    """debug, info, warning or error."""

    def on_host(self, node_path: Path) -> Path:
        """`node_path` as reachable from here (under `host_root`)."""
        return self.host_root / node_path.relative_to(node_path.anchor)


LEASE_TTL_MARGIN = 5.0
"""Seconds a restart slot's Lease must outlast `--reload-timeout` (API latency, renewal)."""


@dataclass(frozen=True)
class RestartCoordination:
    """How the nodes of a cluster take turns restarting containerd: at most `concurrency` at
    once, each holding one of the Leases `node-agent-restart-<i>` in `lease_namespace`."""

    concurrency: int = 1
    """Slots (Leases); 0 turns coordination off (every node restarts when it needs to)."""

    lease_ttl: float = 60.0
    """`leaseDurationSeconds`: a slot whose Lease stays unchanged this long is free."""

    max_wait: float = 1800.0
    """Restart without a slot once the API has been unreachable this long (fail open)."""

    settle: float = 5.0
    """Seconds to keep the slot after a healthy restart, before the next node may go."""

    lease_namespace: str | None = None
    """Where the slot Leases live; None: not known (required when coordinating)."""

    def lease_ttl_problem(self, restart_timeout: float) -> str | None:
        """Why `lease_ttl` is too short for a restart and its CRI health check, or None."""
        minimum = restart_timeout + LEASE_TTL_MARGIN
        if self.lease_ttl < minimum:
            return (
                f"--restart-lease-ttl ({self.lease_ttl:g}s) must be at least --reload-timeout "
                f"({restart_timeout:g}s) + {LEASE_TTL_MARGIN:g}s, so that a slot held through "
                "a restart and its health check never expires"
            )
        return None


@dataclass(frozen=True)
class DaemonSettings:
    """What `node-agent run` needs on top of one reconcile's `Settings`."""

    node: Settings = field(default_factory=Settings)
    """Every `reconcile` flag: file sources, node files, state, containerd restart."""

    secrets: tuple[ObjectRef, ...] = ()
    """Secrets read through the Kubernetes API, highest priority first. They rank above the
    `--secret-file` sources."""

    fallback_secrets: tuple[ObjectRef, ...] = ()
    """Secrets used only for registries no higher source names; they rank above the
    `--fallback-secret-file` sources."""

    kubeconfig: Path | None = None
    """Kubeconfig for the API; None: in-cluster ServiceAccount, else `$KUBECONFIG`."""

    on_secret_delete: str = "remove"
    """What a Secret the API confirms deleted means: `remove` its registries from the node,
    or `keep` the credentials last read from it (for as long as this process runs)."""

    resync_interval: float = 300.0
    """Seconds between full checks of sources and node files (covers missed file events)."""

    debounce: float = 0.2
    """Seconds after a pass during which new requests are collected into one more pass."""

    min_restart_interval: float = 30.0
    """Minimum seconds between two containerd restart attempts; changes that need a restart
    within it are applied by one restart when it has passed."""

    node_name: str | None = None
    """This node's name, for Events (`involvedObject` kind Node)."""

    metrics_address: str = ":9464"
    """`[HOST]:PORT` of the /metrics, /healthz and /readyz server; empty HOST: every address."""

    events: bool = False
    """Record Kubernetes Events on the Node."""

    once: bool = False
    """Read every source once, run one pass, exit (for debugging)."""

    restarts: RestartCoordination = field(default_factory=RestartCoordination)
    """Fleet-wide pacing of containerd restarts through Lease slots."""

    recover_stuck_pods: bool = False
    """After a pass made a registry's credentials effective on this node, evict this node's
    pods stuck pulling from it (pods with a controller) or tell them (pods without one).
    Needs an API source and `node_name`."""

    recover_stuck_pods_rate: int = 10
    """At most this many evictions a minute on this node."""

    @property
    def coordinates_restarts(self) -> bool:
        """Whether containerd restarts wait for a Lease slot: the daemon restarts containerd,
        and coordination is not off. (`--once`, for debugging one node, never waits.)"""
        node = self.node
        return (
            self.restarts.concurrency > 0
            and node.restart_mode != "none"
            and "containerd" in node.targets
            and not node.dry_run
            and not self.once
        )

    @property
    def uses_api(self) -> bool:
        """Whether the Kubernetes API is needed at all (API sources, Events, Lease slots)."""
        return bool(
            self.secrets or self.fallback_secrets or self.events or self.coordinates_restarts
        )
