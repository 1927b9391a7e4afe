"""Node Events as the daemon records them, kept in a list instead of sent to the API."""

from dataclasses import dataclass, field

from node_agent.daemon.reporting import EventType


@dataclass
class RecordedEvents:
    """An `EventSink` that keeps (type, reason, message) of every Event, in order."""

    recorded: list[tuple[str, str, str]] = field(default_factory=list)

    def record(self, reason: str, message: str, *, type: EventType = "Normal") -> None:
        self.recorded.append((type, reason, message))

    def close(self, timeout: float = 2.0) -> bool:
        return True
