"""Plain types exchanged between `client` (which talks to the API) and its users."""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from node_agent.kube.errors import ApiInvalid

RequestTimeout = tuple[float, float]
"""(connect, read) seconds for one HTTP request; for a watch, read bounds a silent stream."""


@dataclass(frozen=True)
class ObjectRef:
    """A namespaced object, shown as `namespace/name` (the `source` label of metrics)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def resource_version_of(source: ObjectRef, obj: Mapping[str, Any]) -> str:
    """`metadata.resourceVersion` of an API object; ApiInvalid when it has none."""
    metadata = obj.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
    if not isinstance(version, str) or not version:
        raise ApiInvalid(str(source), "API object without metadata.resourceVersion")
    return version


@dataclass(frozen=True)
class ObjectList:
    """The answer to a list: raw items (API JSON) and the list's resourceVersion."""

    items: Sequence[Mapping[str, Any]]
    resource_version: str


@dataclass(frozen=True)
class WatchEvent:
    """One watch event: ADDED, MODIFIED, DELETED or BOOKMARK, with the raw object."""

    type: str
    object: Mapping[str, Any]

    @property
    def name(self) -> str | None:
        metadata = self.object.get("metadata")
        return metadata.get("name") if isinstance(metadata, Mapping) else None


class EventStream(Protocol):
    """An open watch. Iterating yields events until the server ends the stream cleanly;
    failures raise `node_agent.kube.errors` types (410 as WatchExpired)."""

    def __iter__(self) -> Iterator[WatchEvent]: ...

    def interrupt(self) -> None:
        """End the stream from another thread: a blocked read returns at once."""

    def close(self) -> None:
        """Release the connection (from the iterating thread)."""


class SecretApi(Protocol):
    """What `SecretWatcher` needs from the API."""

    def list_secret(self, ref: ObjectRef, *, request_timeout: RequestTimeout) -> ObjectList: ...

    def watch_secret(
        self,
        ref: ObjectRef,
        *,
        resource_version: str,
        timeout_seconds: int,
        request_timeout: RequestTimeout,
    ) -> EventStream: ...


class EventApi(Protocol):
    """What `events.NodeEventRecorder` needs from the API. Failures raise
    `node_agent.kube.errors` types (`reason` forbidden, unreachable or invalid)."""

    def create_event(
        self, namespace: str, event: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> Mapping[str, Any]: ...

    def patch_event(
        self, ref: ObjectRef, patch: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> Mapping[str, Any] | None:
        """The patched object, or None when it does not exist (any more)."""


class LeaseApi(Protocol):
    """What the restart slots need from the API: coordination.k8s.io/v1 Leases in one
    namespace, raw JSON in and out. Failures raise `node_agent.kube.errors` types: a 409
    `ApiConflict`, a 404 on replace `ObjectMissing`, the rest like the Secret calls."""

    def list_leases(self, namespace: str, *, request_timeout: RequestTimeout) -> ObjectList: ...

    def watch_leases(
        self,
        namespace: str,
        *,
        resource_version: str,
        timeout_seconds: int,
        request_timeout: RequestTimeout,
    ) -> EventStream: ...

    def create_lease(
        self, namespace: str, lease: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> Mapping[str, Any]:
        """The created Lease; `ApiConflict(already_exists=True)` if the name is taken."""
        ...

    def replace_lease(
        self, ref: ObjectRef, lease: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> Mapping[str, Any]:
        """PUT `lease`, which carries the `metadata.resourceVersion` it was read at: the
        stored Lease, or `ApiConflict` when someone changed it since."""
        ...


class PodApi(Protocol):
    """What stuck-pod recovery needs from the API: the pods of one node, the Eviction API
    (policy/v1, so PodDisruptionBudgets hold) and Events about pods. Failures raise
    `node_agent.kube.errors` types: a 429 on an eviction `EvictionRefused`, a 404
    `ObjectMissing` (the pod is gone), the rest like the Secret calls."""

    def list_pods_on_node(self, node: str, *, request_timeout: RequestTimeout) -> ObjectList:
        """Every pod bound to `node`, in every namespace (field selector `spec.nodeName`)."""
        ...

    def evict_pod(self, ref: ObjectRef, *, request_timeout: RequestTimeout) -> None: ...

    def create_event(
        self, namespace: str, event: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> Mapping[str, Any]: ...
