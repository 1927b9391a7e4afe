"""Wires `Settings` into the pieces: the node files and their formats, the state, the
containerd restart, the credential sources. The node's one `Reconciler` is built here, for
the one-shot commands and the daemon alike."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node_agent.atomic import read_snapshot
from node_agent.containerd_restart import Restarter, make_restarter, restart_and_check
from node_agent.containerd_versions import UNKNOWN, ConfigTomlAuth, ContainerdSupport, support_for
from node_agent.credentials import Credentials
from node_agent.cri import CriClient, CriError
from node_agent.errors import NodeAgentError
from node_agent.host_paths import resolve_in_root
from node_agent.kubelet_start import KubeletRestartCheck
from node_agent.kubelet_start import kubelet_restart_check as check_kubelet_restart
from node_agent.ownership import StateStore
from node_agent.reconcile import ContainerdRestart, NodeFile, Reconciler
from node_agent.secret_files import load_credentials
from node_agent.settings import Settings
from node_agent.targets.containerd import ContainerdFormat, ParsedTexts
from node_agent.targets.credential_provider import (
    PLUGIN_NAME,
    RESPONSE_NAME,
    PluginFormat,
    ProviderConfigFormat,
    ResponseFormat,
)
from node_agent.targets.kubelet import KubeletFormat

log = logging.getLogger(__name__)

#: The agent's own file in a directory of CredentialProviderConfigs.
PROVIDER_CONFIG_FILE = f"{PLUGIN_NAME}.yaml"
_CONFIG_SUFFIXES = frozenset({".json", ".yaml", ".yml"})
#: The plugin's mode: the kubelet executes it; it holds no credential.
_PLUGIN_MODE = 0o755

#: Seconds to wait for containerd's CRI `Version` when deciding about config.toml: a node
#: without containerd answering must not slow every command down.
_VERSION_TIMEOUT = 1.0


@dataclass(frozen=True)
class RestartContainerd:
    """`ContainerdRestart` for real: restart through the chosen strategy, then wait for CRI."""

    restarter: Restarter
    socket_path: str
    timeout: float

    def restart_and_verify(self) -> None:
        restart_and_check(self.restarter, socket_path=self.socket_path, timeout=self.timeout)


def node_files(settings: Settings) -> list[NodeFile]:
    """The node files `settings.targets` selects, as paths reachable from here."""
    available = {
        "containerd": [
            NodeFile(
                ContainerdFormat(
                    new_file_version=settings.containerd_config_version, memo=ParsedTexts()
                ),
                settings.on_host(settings.containerd_config),
                restarts_containerd=True,
                root=settings.host_root,
            )
        ],
        "kubelet": [
            NodeFile(
                KubeletFormat(), settings.on_host(settings.kubelet_config), root=settings.host_root
            )
        ],
        "credential-provider": credential_provider_files(settings),
    }
    return [node_file for name in settings.targets for node_file in available[name]]


def credential_provider_files(settings: Settings) -> list[NodeFile]:
    """The response first: the plugin answers with it, and the config names the plugin."""
    cache_duration = settings.credential_provider_cache_duration
    bin_dir = settings.on_host(settings.credential_provider_bin_dir)
    return [
        NodeFile(
            ResponseFormat(cache_duration=cache_duration),
            bin_dir / RESPONSE_NAME,
            root=settings.host_root,
        ),
        NodeFile(
            PluginFormat(),
            bin_dir / PLUGIN_NAME,
            root=settings.host_root,
            mode=_PLUGIN_MODE,
            keys_are_registries=False,
        ),
        NodeFile(
            ProviderConfigFormat(
                cache_duration=cache_duration,
                match_all=settings.credential_provider_match_images == "all",
            ),
            provider_config_path(settings),
            root=settings.host_root,
            read_at_kubelet_start=True,
            keys_are_registries=False,
        ),
    ]


def containerd_restart(settings: Settings) -> ContainerdRestart | None:
    """How containerd gets restarted, or None when it must not be (--reload none)."""
    if settings.restart_mode == "none" or "containerd" not in settings.targets:
        return None
    restarter = make_restarter(
        settings.restart_mode,
        command=settings.restart_command,
        bus_address=f"unix:path={settings.on_host(settings.system_bus_socket)}",
        trigger_dir=settings.on_host(settings.restart_trigger_dir),
        root=settings.host_root,
    )
    socket = str(settings.on_host(settings.containerd_socket))
    return RestartContainerd(restarter, socket, settings.restart_timeout)


def provider_config_path(settings: Settings) -> Path:
    """The CredentialProviderConfig the agent keeps its entry in. Where
    --credential-provider-config names a directory (the kubelet reads every *.json, *.yaml and
    *.yml in one since 1.34, and refuses a provider name found twice): the file there that
    already names the agent's provider, else a file of the agent's own."""
    path = settings.on_host(settings.credential_provider_config)
    directory = resolve_in_root(settings.host_root, path).path
    if not directory.is_dir():
        return path
    try:
        names = sorted(entry.name for entry in directory.iterdir())
    except OSError:
        names = []  # unlistable: the pass then says what is wrong with the directory
    for name in names:
        if Path(name).suffix in _CONFIG_SUFFIXES and _names_the_plugin(path / name, settings):
            return path / name
    return path / PROVIDER_CONFIG_FILE


def _names_the_plugin(candidate: Path, settings: Settings) -> bool:
    """Read as every node file is (links followed inside the host root, no FIFO waited on)."""
    try:
        content = read_snapshot(candidate, root=settings.host_root).content
    except NodeAgentError:
        return False
    return content is not None and PLUGIN_NAME.encode() in content


def kubelet_restart_check(
    settings: Settings, reconciler: Reconciler
) -> KubeletRestartCheck | None:
    """Whether the kubelet still runs an older version of the reconciler's file it reads
    only at start (the CredentialProviderConfig), asked of systemd on the node's system bus;
    None when the reconciler has no such file."""
    config = next((f.path for f in reconciler.node_files if f.read_at_kubelet_start), None)
    if config is None:
        return None
    return check_kubelet_restart(
        config,
        root=settings.host_root,
        bus_address=f"unix:path={settings.on_host(settings.system_bus_socket)}",
    )


def containerd_support(settings: Settings) -> ContainerdSupport:
    """What to do with config.toml for the containerd this node runs (CRI `Version`, asked
    once); `UNKNOWN` (keep writing it, as always) when containerd does not answer."""
    if "containerd" not in settings.targets:
        return UNKNOWN
    socket = resolve_in_root(settings.host_root, settings.on_host(settings.containerd_socket))
    try:
        with CriClient(str(socket.path), timeout=_VERSION_TIMEOUT) as cri:
            runtime = cri.version(timeout=_VERSION_TIMEOUT)
    except CriError as error:
        log.debug("containerd did not say its version (%s): config.toml kept as before", error)
        return UNKNOWN
    return support_for(runtime.runtime_version)


def build_reconciler(
    settings: Settings,
    *,
    support: ContainerdSupport = UNKNOWN,
    clock: Callable[[], float] = time.monotonic,
) -> Reconciler:
    """The node's one reconciler (the one-shot commands' and the daemon's). With a
    containerd that no longer reads config.toml auth, its file is not among the node's."""
    files = node_files(settings)
    if support.auth is ConfigTomlAuth.LEAVE_ALONE:
        files = [node_file for node_file in files if not node_file.restarts_containerd]
    return Reconciler(
        node_files=files,
        state_store=StateStore(settings.on_host(settings.state_dir), root=settings.host_root),
        containerd=containerd_restart(settings),
        dry_run=settings.dry_run,
        clock=clock,
    )


def load_sources(settings: Settings) -> Credentials:
    # Secret files are the agent's own inputs (e.g. a mounted Secret volume), not node paths.
    return load_credentials(settings.secret_files, settings.fallback_secret_files)
