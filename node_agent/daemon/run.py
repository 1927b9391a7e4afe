"""`node-agent run`: build the daemon from `DaemonSettings`, log the effective configuration,
run until SIGTERM/SIGINT (or one pass with `--once`), return an exit code."""

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import FrameType

from node_agent import __version__
from node_agent.daemon.daemon import ApiClient, Daemon, DaemonParts, StartupFailed
from node_agent.daemon.reporting import EventSink, NoEvents
from node_agent.daemon.worker import WorkerTiming
from node_agent.exit_codes import EXIT_ERROR, EXIT_OK
from node_agent.kube.secret_watch import WatchSettings
from node_agent.metrics import AgentMetrics
from node_agent.restart_slots.coordinator import SlotTiming
from node_agent.settings import DaemonSettings
from node_agent.status_server import Health, StatusServer

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# A pass can take a restart and, after a rollback, a second one: liveness must not fail then.
_LIVENESS_MARGIN = 30.0


def build_daemon(
    settings: DaemonSettings,
    *,
    watch_settings: WatchSettings | None = None,
    timing: WorkerTiming | None = None,
    slot_timing: SlotTiming | None = None,
    environ: Mapping[str, str] = os.environ,
    clock: Callable[[], float] = time.monotonic,
) -> Daemon:
    """The daemon with its real parts: metrics registry, health, status server, API client
    (only if needed) and Node Event recorder (only with Events on)."""
    metrics = AgentMetrics()
    metrics.add_targets(settings.node.targets)
    health = Health(
        clock=clock, stale_after=max(60.0, 2 * settings.node.restart_timeout + _LIVENESS_MARGIN)
    )
    api = _connect(settings, environ) if settings.uses_api else None
    parts = DaemonParts(
        metrics=metrics,
        health=health,
        events=_event_recorder(settings, api),
        api=api,
        status=None if settings.once else _status_server(settings, metrics, health),
        watch_settings=watch_settings or WatchSettings(),
        timing=timing or WorkerTiming(resync_interval=settings.resync_interval),
        slot_timing=slot_timing or SlotTiming(),
        clock=clock,
    )
    daemon = Daemon(settings, parts)
    metrics.add_sources(daemon.sources.names)
    return daemon


def run_daemon(settings: DaemonSettings, *, signals: Sequence[int] = STOP_SIGNALS) -> int:
    """Run until one of `signals` (or one pass with `--once`); the exit code."""
    log_configuration(settings)
    daemon = build_daemon(settings)
    if settings.once:
        report = daemon.run_once()
        return EXIT_OK if report is not None and report.result != "error" else EXIT_ERROR
    stopping = threading.Event()
    previous = {number: signal.signal(number, _setter(stopping)) for number in signals}
    try:
        daemon.start()
        stopping.wait()
        log.info("stopping")
    finally:
        daemon.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
    log.info("stopped")
    return EXIT_OK


def effective_configuration(settings: DaemonSettings) -> dict[str, str]:
    """Every setting that shapes the daemon, as text. Settings hold names and paths only,
    never credentials."""
    node = settings.node
    return {
        "secrets": _listed(map(str, settings.secrets)),
        "fallback_secrets": _listed(map(str, settings.fallback_secrets)),
        "secret_files": _listed(map(str, node.secret_files)),
        "fallback_secret_files": _listed(map(str, node.fallback_secret_files)),
        "targets": ",".join(node.targets),
        "containerd_config": str(node.on_host(node.containerd_config)),
        "kubelet_config": str(node.on_host(node.kubelet_config)),
        "state_dir": str(node.on_host(node.state_dir)),
        "reload": node.restart_mode
        + (f" ({' '.join(node.restart_command)})" if node.restart_command else ""),
        "containerd_socket": str(node.on_host(node.containerd_socket)),
        "on_secret_delete": settings.on_secret_delete,
        "resync_interval": f"{settings.resync_interval:g}s",
        "debounce": f"{settings.debounce:g}s",
        "min_restart_interval": f"{settings.min_restart_interval:g}s",
        "kubeconfig": str(settings.kubeconfig) if settings.kubeconfig else "(default)",
        "node_name": settings.node_name or "-",
        "events": "on" if settings.events else "off",
        "metrics_address": "-" if settings.once else settings.metrics_address,
        "dry_run": str(node.dry_run).lower(),
        "once": str(settings.once).lower(),
        "restart_slots": _restart_slots_text(settings),
        "recover_stuck_pods": (
            f"on (at most {settings.recover_stuck_pods_rate} evictions a minute)"
            if settings.recover_stuck_pods
            else "off"
        ),
    }


def _restart_slots_text(settings: DaemonSettings) -> str:
    restarts = settings.restarts
    if not settings.coordinates_restarts:
        return "off"
    return (
        f"{restarts.concurrency} (leases {restarts.lease_namespace}/node-agent-restart-*, "
        f"ttl {restarts.lease_ttl:g}s, max wait {restarts.max_wait:g}s, "
        f"settle {restarts.settle:g}s)"
    )


def log_configuration(settings: DaemonSettings) -> None:
    configuration = effective_configuration(settings)
    log.info(
        "node-agent %s run: %s",
        __version__,
        " ".join(f"{k}={v}" for k, v in configuration.items()),
    )


def _listed(values: Iterable[str]) -> str:
    return ",".join(values) or "-"


def _connect(settings: DaemonSettings, environ: Mapping[str, str]) -> ApiClient:
    from node_agent.kube.client import KubeApi  # noqa: PLC0415 - kubernetes only when needed

    try:
        return KubeApi.connect(kubeconfig=settings.kubeconfig, environ=environ)
    except Exception as error:  # the client raises its own ConfigException, OSError, ...
        raise StartupFailed(f"cannot configure the Kubernetes client: {error}") from error


def _event_recorder(settings: DaemonSettings, api: ApiClient | None) -> EventSink:
    if not settings.events:
        return NoEvents()
    from node_agent.kube.client import KubeApi  # noqa: PLC0415
    from node_agent.kube.events import NodeEventRecorder  # noqa: PLC0415

    if not isinstance(api, KubeApi) or not settings.node_name:
        raise StartupFailed("Events need the Kubernetes API and --node-name")
    return NodeEventRecorder(api, node_name=settings.node_name)


def _status_server(settings: DaemonSettings, metrics: AgentMetrics, health: Health) -> StatusServer:
    try:
        return StatusServer(settings.metrics_address, metrics=metrics, health=health)
    except ValueError as error:
        raise StartupFailed(str(error)) from error


def _setter(event: threading.Event) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        event.set()

    return handler
