"""The agent's Prometheus metrics, on a registry of its own (no process-wide globals).

Names and labels are a contract (the alert rules and dashboards use them): change them only
together with `daemonset/monitoring/`. No label ever holds a credential or a username: `target` is
`containerd` or `kubelet`, `source` is `namespace/name` or a file path, `reason` and `result`
come from the small fixed sets below.
"""

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from node_agent import __version__

TARGETS = ("containerd", "kubelet")
RECONCILE_RESULTS = ("applied", "noop", "error")
RESTART_RESULTS = ("success", "rolled_back", "failed")
SOURCE_ERROR_REASONS = ("invalid", "forbidden", "unreachable", "conflict")
STUCK_POD_RESULTS = ("evicted", "refused", "skipped_unowned")

# Reconciles are milliseconds unless containerd restarts (seconds): buckets cover both.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics:
    """Every metric the agent exports. Pass `registry` to isolate (tests use a fresh one)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=self.registry)  # RSS, CPU, open fds of the agent
        self.build_info = Gauge(
            "node_agent_build_info",
            "Always 1; the agent's version in the label (which version runs on which node).",
            ["version"],
            registry=self.registry,
        )
        self.build_info.labels(version=__version__).set(1)
        self.reconcile_total = Counter(
            "node_agent_reconcile",
            "Reconcile passes by result: applied (a file changed), noop, error.",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_duration_seconds = Histogram(
            "node_agent_reconcile_duration_seconds",
            "Time for one reconcile pass, containerd restart included.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.drift_repairs_total = Counter(
            "node_agent_drift_repairs",
            "Owned entries found changed or removed by someone else, and written back.",
            ["target"],
            registry=self.registry,
        )
        self.in_sync = Gauge(
            "node_agent_in_sync",
            "1 when the node file carries exactly the desired entries, else 0.",
            ["target"],
            registry=self.registry,
        )
        self.managed_registries = Gauge(
            "node_agent_managed_registries",
            "Registry entries the agent manages in the node file.",
            ["target"],
            registry=self.registry,
        )
        self.last_success_timestamp_seconds = Gauge(
            "node_agent_last_success_timestamp_seconds",
            "Unix time of the last reconcile that ended in sync.",
            registry=self.registry,
        )
        self.containerd_restarts_total = Counter(
            "node_agent_containerd_restarts",
            "containerd restarts by result: success, rolled_back (new config undone, "
            "containerd healthy on the old one), failed (containerd not healthy).",
            ["result"],
            registry=self.registry,
        )
        self.source_errors_total = Counter(
            "node_agent_source_errors",
            "Credential source failures by source and reason "
            "(invalid, forbidden, unreachable, conflict).",
            ["source", "reason"],
            registry=self.registry,
        )
        self.watch_restarts_total = Counter(
            "node_agent_watch_restarts",
            "Times the watch of a Kubernetes source was restarted.",
            ["source"],
            registry=self.registry,
        )
        self.kubelet_restart_needed = Gauge(
            "node_agent_kubelet_restart_needed",
            "1 while the kubelet runs an older CredentialProviderConfig than the one on disk "
            "(it reads it only when it starts): kubelet.service last started before the file "
            "last changed, as systemd says; where systemd cannot say, 1 once this agent "
            "changed its entry there.",
            registry=self.registry,
        )
        self.restart_pending = Gauge(
            "node_agent_restart_pending",
            "1 while containerd's new config waits for a restart slot (a Lease "
            "node-agent-restart-<i>), else 0. config.json is already updated then.",
            registry=self.registry,
        )
        self.stuck_pods_recovered_total = Counter(
            "node_agent_stuck_pods_recovered",
            "Pods stuck on an image pull whose registry's credentials became effective on "
            "the node (--recover-stuck-pods), by result: evicted, refused (429: a disruption "
            "budget said not now; retried), skipped_unowned (no controller: told by an Event, "
            "never deleted).",
            ["result"],
            registry=self.registry,
        )
        self._initialise_label_sets()

    def _initialise_label_sets(self) -> None:
        # Series that exist from the start (at 0) make rate() and absent() alerts work.
        for result in RECONCILE_RESULTS:
            self.reconcile_total.labels(result=result)
        for result in RESTART_RESULTS:
            self.containerd_restarts_total.labels(result=result)
        for target in TARGETS:
            self.drift_repairs_total.labels(target=target)

    def add_targets(self, targets: Iterable[str]) -> None:
        """Create the per-target gauges (at 0, i.e. not in sync yet) for managed targets only,
        so an unmanaged target never looks out of sync."""
        for target in targets:
            self.in_sync.labels(target=target)
            self.managed_registries.labels(target=target)

    def add_stuck_pod_recovery(self) -> None:
        """Create the stuck-pod series at 0, only when that recovery is on."""
        for result in STUCK_POD_RESULTS:
            self.stuck_pods_recovered_total.labels(result=result)

    def add_sources(self, sources: Iterable[str]) -> None:
        """Create the per-source series at 0 for every configured source."""
        for source in sources:
            self.watch_restarts_total.labels(source=source)
            for reason in SOURCE_ERROR_REASONS:
                self.source_errors_total.labels(source=source, reason=reason)

    def metric_names(self) -> set[str]:
        """Every sample name this registry exports (for checking alert rules against)."""
        return {sample.name for family in self.registry.collect() for sample in family.samples}
