"""The restart slots' settings: what the daemon resolved (`SlotConfig`) and the slot thread's
delays (`SlotTiming`)."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotConfig:
    """The coordination settings, resolved."""

    node: str
    namespace: str
    concurrency: int
    lease_ttl: float
    max_wait: float
    settle: float

    @property
    def lease_seconds(self) -> int:
        """`leaseDurationSeconds` (whole seconds, rounded up)."""
        return max(1, math.ceil(self.lease_ttl))

    @property
    def renew_every(self) -> float:
        return self.lease_seconds / 3


@dataclass(frozen=True)
class SlotTiming:
    """Delays of the slot thread, in seconds. The defaults suit a real cluster."""

    start_jitter: float = 2.0
    """A wait starts after uniform(0, start_jitter): nodes that saw the same Secret change
    in the same second do not all ask the API at once."""
    longest_watch: float = 30.0
    """The slow poll: a Lease watch is reopened (after a fresh list) at least this often."""
    claim_spread: float = 0.1
    """A freed slot seen on the watch is claimed after uniform(0, claim_spread): among many
    waiting nodes the first wins within milliseconds, and the others see it and stay quiet."""
    conflict_backoff: float = 0.1
    """After a 409, wait uniform(0, this) before reading the slots again: long enough to
    spread the nodes that lost the same race, short enough not to leave a slot idle."""
    retry_initial: float = 1.0
    retry_max: float = 30.0
    """Backoff between attempts while the API fails."""
    renew_retry: float = 1.0
    """After a failed renewal or release, try again this soon."""
    connect_timeout: float = 5.0
    read_timeout: float = 10.0

    @property
    def request_timeout(self) -> tuple[float, float]:
        """(connect, read) for one request that is not a watch."""
        return (self.connect_timeout, self.read_timeout)
