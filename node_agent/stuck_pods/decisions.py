"""The decisions of stuck-pod recovery, pure: when a credential change is effective on the
node, which pods are stuck on which registry, what to do with each, how many evictions the
budget allows. No I/O, no clock: times are passed in (monotonic seconds).
"""

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from node_agent.stuck_pods.images import image_registry, serves

KUBELET_CREDENTIAL_CACHE_SECONDS = 300.0
"""kubelet keeps what it read from config.json this long before it reads the file again
(docs/node-facts.md#kubelet-precedence)."""

EVICTION_WINDOW_SECONDS = 60.0
"""The eviction budget (`--recover-stuck-pods-rate`) counts evictions per this window."""

PULL_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff"})
"""The waiting reasons of a container whose image pull failed."""

RestartState = Literal["healthy", "not_needed", "owed", "failed"]
"""For a target whose file is read only when its consumer starts (containerd; the kubelet for
the credential provider's config): restarted and healthy; no restart owed (`--reload none`);
a restart owed and not made yet; the restart failed or was rolled back."""


@dataclass(frozen=True)
class AppliedChange:
    """One registry's entry that a pass wrote into one target."""

    target: str
    """The node file's name: `containerd`, `kubelet`, `credential-provider-response`."""
    registry: str
    """The registry, normalised like the Secret keys (`docker.io` for Docker Hub)."""
    at: float
    """When the pass finished (monotonic seconds)."""
    replaced: bool
    """The target already held an entry for the registry: the change is a rotation."""
    restart: RestartState = "not_needed"


@dataclass(frozen=True)
class Effective:
    """When pulls on this node can use a change, and why from then on (for log lines)."""

    at: float
    why: str


def effective(change: AppliedChange) -> Effective | None:
    """When `change` serves pulls; None: not known to, ever (never act on it). One case per
    target: a new target adds its case here."""
    match change.target:
        case "containerd" if change.restart == "healthy":
            return Effective(change.at, "containerd restarted with it and answers CRI")
        case "containerd" if change.restart == "not_needed":
            return Effective(change.at, "config.toml written, no containerd restart owed")
        case "kubelet":
            return Effective(
                change.at + KUBELET_CREDENTIAL_CACHE_SECONDS,
                "config.json written and kubelet's 5-minute credential cache expired",
            )
        case "credential-provider-response" if change.restart == "not_needed":
            # The kubelet asks the plugin on every pull, uncached; not so for a registry
            # just added to the provider's matchImages: that waits for the kubelet's restart.
            return Effective(change.at, "the credential provider's response file written")
    return None


def registry_effective(changes: Sequence[AppliedChange]) -> Effective | None:
    """When pulls from one registry can use what `changes` (its changes not yet acted on)
    wrote. The first target to serve wins, except while kubelet still sends a credential it
    replaced: kubelet sends a matching config.json entry with every pull and never falls back
    to containerd's, so a rotation waits for kubelet's cache (a new entry does not: until
    kubelet reads it, nothing in config.json matches and containerd's credential is used)."""
    shadowing = [c for c in changes if c.target == "kubelet" and c.replaced]
    if shadowing:
        return max((e for c in shadowing if (e := effective(c))), key=_time)
    known = [e for c in changes if (e := effective(c)) is not None]
    return min(known, key=_time, default=None)


def _time(effect: Effective) -> float:
    return effect.at


# --- pods -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StuckContainer:
    name: str
    image: str
    reason: str
    """ErrImagePull or ImagePullBackOff."""


@dataclass(frozen=True)
class StuckPod:
    """A pod on this node with at least one container (init containers too) waiting on a
    failed image pull."""

    namespace: str
    name: str
    uid: str
    controller: str | None
    """`Kind/name` of the owner reference with `controller: true`; None: no controller."""
    controller_uid: str | None
    containers: tuple[StuckContainer, ...]

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    def registry_served_by(self, keys: Iterable[str]) -> str | None:
        """The first of `keys` that serves the image of a stuck container."""
        keys = sorted(keys)
        for container in self.containers:
            registry = image_registry(container.image)
            match = next((k for k in keys if registry and serves(k, registry)), None)
            if match is not None:
                return match
        return None


def stuck_pod(pod: Mapping[str, Any], *, node: str) -> StuckPod | None:
    """The pod as a `StuckPod`; None when it is not on `node`, already being deleted, or has
    no container waiting on a failed pull."""
    metadata, spec, status = _map(pod, "metadata"), _map(pod, "spec"), _map(pod, "status")
    if spec.get("nodeName") != node or metadata.get("deletionTimestamp"):
        return None
    images = {
        c.get("name"): c.get("image")
        for key in ("initContainers", "containers")
        for c in _maps(spec, key)
    }
    stuck = tuple(
        StuckContainer(str(s.get("name")), str(images.get(s.get("name")) or s.get("image")), reason)
        for key in ("initContainerStatuses", "containerStatuses")
        for s in _maps(status, key)
        if (reason := _map(_map(s, "state"), "waiting").get("reason")) in PULL_FAILURES
    )
    uid = metadata.get("uid")
    if not stuck or not isinstance(uid, str):
        return None
    owner = next((o for o in _maps(metadata, "ownerReferences") if o.get("controller") is True), {})
    return StuckPod(
        namespace=str(metadata.get("namespace")),
        name=str(metadata.get("name")),
        uid=uid,
        controller=f"{owner['kind']}/{owner['name']}" if owner.get("kind") else None,
        controller_uid=str(owner["uid"]) if owner.get("uid") else None,
        containers=stuck,
    )


def _map(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _maps(obj: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = obj.get(key)
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


# --- what to do -----------------------------------------------------------------------------

Action = Literal["evict", "tell", "report"]
"""evict: through the Eviction API; tell: a Warning Event on a pod without a controller,
which is never deleted; report: a pod whose controller's pod was evicted for this registry
and that fails again: left to kubelet, said once."""


@dataclass(frozen=True)
class Memory:
    """What the recovery remembers, as the decisions need it."""

    evicted: Collection[str] = frozenset()
    """Pod UIDs evicted, ever: a pod is evicted at most once."""
    told: Collection[str] = frozenset()
    """UIDs of pods without a controller that got their Event."""
    reported: Collection[str] = frozenset()
    """UIDs of pods reported as failing again after a recovery."""
    recovered: Collection[tuple[str, str]] = frozenset()
    """(controller UID, registry) of every eviction since the registry's credentials last
    became effective."""
    candidates: Collection[str] = frozenset()
    """UIDs of pods that were chosen for eviction since then (evicted or still waiting)."""


@dataclass(frozen=True)
class Recovery:
    pod: StuckPod
    registry: str
    """The credential key the pod's image is pulled with."""
    action: Action


def recoveries(
    pods: Iterable[StuckPod], registries: Collection[str], memory: Memory
) -> list[Recovery]:
    """What to do with each stuck pod whose image is pulled from one of `registries`."""
    chosen = []
    for pod in pods:
        registry = pod.registry_served_by(registries)
        action = None if registry is None else decide(pod, registry, memory)
        if registry is not None and action is not None:
            chosen.append(Recovery(pod, registry, action))
    return chosen


def decide(pod: StuckPod, registry: str, memory: Memory) -> Action | None:
    """What to do with `pod`, stuck on `registry`, now that its credentials are effective;
    None: nothing (again)."""
    if pod.uid in memory.evicted:
        return None
    if pod.controller_uid is None:
        return None if pod.uid in memory.told else "tell"
    recovered = (pod.controller_uid, registry) in memory.recovered
    if recovered and pod.uid not in memory.candidates:  # a replacement, failing again
        return None if pod.uid in memory.reported else "report"
    return "evict"


def evictions_allowed(attempts: Iterable[float], *, now: float, per_minute: int) -> int:
    """How many evictions may start now, given when the recent ones started."""
    recent = sum(1 for at in attempts if now - at < EVICTION_WINDOW_SECONDS)
    return max(0, per_minute - recent)


def budget_frees_at(attempts: Iterable[float], *, now: float) -> float:
    """When the oldest eviction in the window leaves it (`now` if none is in it)."""
    recent = [at for at in attempts if now - at < EVICTION_WINDOW_SECONDS]
    return min(recent) + EVICTION_WINDOW_SECONDS if recent else now
