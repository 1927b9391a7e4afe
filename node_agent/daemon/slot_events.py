"""The restart slot's story → the `node_agent_restart_pending` gauge and Node Events.

Messages name slots, namespaces and API errors (which carry statuses, never data).
"""

from node_agent.daemon.reporting import EventSink
from node_agent.metrics import AgentMetrics
from node_agent.restart_slots.leases import SLOT_PREFIX

QUEUED = "ContainerdRestartQueued"
UNCOORDINATED = "ContainerdRestartUncoordinated"
SLOT_KEPT = "ContainerdRestartSlotKept"


class SlotEvents:
    """`SlotReporter` for the daemon."""

    def __init__(self, *, metrics: AgentMetrics, events: EventSink) -> None:
        self._metrics = metrics
        self._events = events

    def restart_queued(self, *, slots: int, namespace: str) -> None:
        self._metrics.restart_pending.set(1)
        self._events.record(
            QUEUED,
            "config.json is updated; restarting containerd for its new config.toml waits for "
            f"one of {slots} restart slots (Leases {SLOT_PREFIX}* in namespace {namespace})",
        )

    def restart_wait_over(self) -> None:
        self._metrics.restart_pending.set(0)

    def restart_slot_acquired(self, slot: str, *, waited: float) -> None:
        self._metrics.restart_pending.set(0)

    def restart_failed_open(self, *, unreachable_for: float, problem: str) -> None:
        self._metrics.restart_pending.set(0)
        self._events.record(
            UNCOORDINATED,
            f"the Kubernetes API has been unreachable for {unreachable_for:.0f}s, longer than "
            f"--restart-max-wait: restarting containerd without a restart slot ({problem})",
            type="Warning",
        )

    def restart_slot_kept(self, slot: str, *, namespace: str) -> None:
        self._events.record(
            SLOT_KEPT,
            f"containerd was not healthy with the new config.toml; keeping restart slot {slot} "
            "so the change stops here instead of spreading to other nodes. A later change that "
            "restarts healthy releases it; to let the rollout go on anyway, clear the Lease's "
            f"holderIdentity: kubectl -n {namespace} patch lease {slot} --type merge "
            '-p \'{"spec":{"holderIdentity":null}}\'',
            type="Warning",
        )

    def restart_slot_released(self, slot: str) -> None:
        """Nothing to show: the log says it."""

    def restart_slot_lost(self, slot: str, *, holder: str | None) -> None:
        """Nothing to show: the log says it."""
