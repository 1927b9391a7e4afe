"""The one module that imports the official `kubernetes` client.

Everything else sees plain JSON mappings (`model`) and the agent's own errors (`errors`).
Lists and watches are read raw (`_preload_content=False`): one data shape for both, no model
deserialisation, and the watch response stays in our hands so another thread can end it.

Facts about the client (kubernetes 37.0.2, urllib3 2.x) this module relies on:
- With `_preload_content=False` a non-2xx answer still raises `ApiException` (status set);
  a 2xx answer returns the urllib3 response, whose chunked body yields one chunk per read.
- `timeoutSeconds` is enforced by the server only; without a read timeout in
  `_request_timeout=(connect, read)` a half-open watch blocks forever. A stalled stream then
  raises urllib3 `ReadTimeoutError`, a dropped one `ProtocolError`: both are retried by the
  caller, with backoff, never inside the client (urllib3 retries are off: one place retries).
- An expired resourceVersion on a watch arrives as HTTP 200 with an ERROR event carrying a
  Status with code 410 (like the API server's watch cache); on a list as HTTP 410.
- Patch methods pick JSON patch (`application/json-patch+json`) as the Content-Type unless
  `_content_type` says otherwise; a dict body then is not a valid patch.
- 37.x wraps every generated method in pydantic's `validate_call`: a dict body is validated
  into the model (`V1Lease`) and serialised back, so fields the model does not know are
  refused before anything is sent and times are re-rendered with `isoformat()` (`.000000Z`
  becomes `+00:00`, which the API server refuses for MicroTime fields such as a Lease's
  `renewTime`). Lease bodies therefore go through the undecorated method (`_as_is`) and are
  sent exactly as given; clients before 37 never validated and send them as given too.
"""

import functools
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Self, cast

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from node_agent.errors import NodeAgentError
from node_agent.escaping import bounded, without_url_userinfo
from node_agent.kube.errors import (
    ApiConflict,
    ApiForbidden,
    ApiInvalid,
    ApiUnavailable,
    EvictionRefused,
    ObjectMissing,
    WatchExpired,
)
from node_agent.kube.model import ObjectList, ObjectRef, RequestTimeout, WatchEvent

log = logging.getLogger(__name__)

_IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
# Enough for urllib3's longest words (host, URL, then the cause at the end); longer text is
# cut at a word boundary, saying how much was left out.
_STATUS_MESSAGE_LIMIT = 500
# Merge patch, not the client's default (JSON patch): the body is a partial object.
_MERGE_PATCH = "application/merge-patch+json"
#: How a cluster-wide list names its scope in errors.
_ALL_NAMESPACES = "*"


def load_api_client(
    *, kubeconfig: Path | None = None, environ: Mapping[str, str] = os.environ
) -> k8s.ApiClient:
    """An ApiClient from, in order: an explicit kubeconfig (`--kubeconfig`), the in-cluster
    ServiceAccount, `$KUBECONFIG`, `~/.kube/config` — the order client-go uses."""
    configuration = k8s.Configuration()
    if kubeconfig is None and environ.get(_IN_CLUSTER_ENV):
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        log.info(
            "Kubernetes API: in-cluster ServiceAccount, %s",
            without_url_userinfo(configuration.host),
        )
    else:
        path = kubeconfig or Path(environ.get("KUBECONFIG") or "~/.kube/config").expanduser()
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(path), client_configuration=configuration, persist_config=False
        )
        log.info(
            "Kubernetes API: kubeconfig %s, %s", path, without_url_userinfo(configuration.host)
        )
    if hasattr(configuration, "keep_alive"):
        # TCP keepalive: an idle proxy or load balancer otherwise drops a quiet watch silently.
        configuration.keep_alive = True
    # One attempt per request: the watch loop is the one place that retries, with backoff.
    configuration.retries = urllib3.util.Retry(total=0, redirect=False)
    return k8s.ApiClient(configuration)


class KubeApi:
    """The API calls node-agent makes, answering in `model` types and `errors` types."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self._api_client = api_client
        self._core = k8s.CoreV1Api(api_client)
        self._coordination = k8s.CoordinationV1Api(api_client)

    @classmethod
    def connect(
        cls, *, kubeconfig: Path | None = None, environ: Mapping[str, str] = os.environ
    ) -> Self:
        return cls(load_api_client(kubeconfig=kubeconfig, environ=environ))

    def close(self) -> None:
        self._api_client.close()  # type: ignore[no-untyped-call]

    def list_secret(self, ref: ObjectRef, *, request_timeout: RequestTimeout) -> ObjectList:
        """The Secret as a list of zero or one items (field selector `metadata.name`), so the
        answer carries a resourceVersion to watch from even when the Secret does not exist."""
        with _translated_errors(ref, "list"):
            body = _read(
                _open(
                    self._core.list_namespaced_secret,
                    ref.namespace,
                    field_selector=f"metadata.name={ref.name}",
                    request_timeout=request_timeout,
                )
            )
        return _object_list(ref, body)

    def watch_secret(
        self,
        ref: ObjectRef,
        *,
        resource_version: str,
        timeout_seconds: int,
        request_timeout: RequestTimeout,
    ) -> "ApiWatchStream":
        """Open a watch on the Secret from `resource_version`, with bookmarks."""
        with _translated_errors(ref, "watch"):
            response = _open(
                self._core.list_namespaced_secret,
                ref.namespace,
                field_selector=f"metadata.name={ref.name}",
                request_timeout=request_timeout,
                **_watch_arguments(resource_version, timeout_seconds),
            )
        return ApiWatchStream(ref, response)

    def create_event(
        self, namespace: str, event: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> dict[str, Any]:
        """Create a core/v1 Event (`metadata.generateName` allowed); the stored Event."""
        ref = ObjectRef(namespace, "events")
        with _translated_errors(ref, "create", resource="events"):
            # 37.x validates the dict into its model; older clients send it as is.
            body = _read(
                _open(
                    self._core.create_namespaced_event,
                    namespace,
                    cast(Any, dict(event)),
                    request_timeout=request_timeout,
                )
            )
        return _parse_json(ref, body)

    def patch_event(
        self, ref: ObjectRef, patch: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> dict[str, Any] | None:
        """Merge-patch a core/v1 Event; the patched Event, or None when it no longer exists
        (events expire after the API server's --event-ttl, 1 h by default)."""
        with _translated_errors(ref, "patch", resource="events"):
            try:
                response = _open(
                    self._core.patch_namespaced_event,
                    ref.name,
                    ref.namespace,
                    dict(patch),
                    _content_type=_MERGE_PATCH,
                    request_timeout=request_timeout,
                )
            except ApiException as error:
                if error.status == 404:
                    return None
                raise
            body = _read(response)
        return _parse_json(ref, body)

    def list_leases(self, namespace: str, *, request_timeout: RequestTimeout) -> ObjectList:
        """Every Lease in `namespace` and the list's resourceVersion to watch from."""
        ref = ObjectRef(namespace, "leases")
        with _lease_errors(ref, "list"):
            body = _read(
                _open(
                    self._coordination.list_namespaced_lease,
                    namespace,
                    request_timeout=request_timeout,
                )
            )
        return _object_list(ref, body)

    def watch_leases(
        self,
        namespace: str,
        *,
        resource_version: str,
        timeout_seconds: int,
        request_timeout: RequestTimeout,
    ) -> "ApiWatchStream":
        """Open a watch on the Leases of `namespace` from `resource_version`, with bookmarks."""
        ref = ObjectRef(namespace, "leases")
        with _lease_errors(ref, "watch"):
            response = _open(
                self._coordination.list_namespaced_lease,
                namespace,
                request_timeout=request_timeout,
                **_watch_arguments(resource_version, timeout_seconds),
            )
        return ApiWatchStream(ref, response, resource="leases")

    def create_lease(
        self, namespace: str, lease: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> dict[str, Any]:
        """POST `lease` as given; the created Lease. `ApiConflict(already_exists=True)` when a
        Lease of that name exists."""
        ref = ObjectRef(namespace, _name_of(lease) or "leases")
        with _lease_errors(ref, "create"):
            body = _read(
                _open(
                    _as_is(self._coordination.create_namespaced_lease),
                    namespace,
                    dict(lease),
                    request_timeout=request_timeout,
                )
            )
        return _parse_json(ref, body)

    def replace_lease(
        self, ref: ObjectRef, lease: Mapping[str, Any], *, request_timeout: RequestTimeout
    ) -> dict[str, Any]:
        """PUT `lease` as given (with the `metadata.resourceVersion` it was read at); the stored
        Lease. `ApiConflict` when it changed since, `ObjectMissing` when it was deleted."""
        with _lease_errors(ref, "update"):
            body = _read(
                _open(
                    _as_is(self._coordination.replace_namespaced_lease),
                    ref.name,
                    ref.namespace,
                    dict(lease),
                    request_timeout=request_timeout,
                )
            )
        return _parse_json(ref, body)

    def list_pods_on_node(self, node: str, *, request_timeout: RequestTimeout) -> ObjectList:
        """Every pod bound to `node`, in every namespace (field selector `spec.nodeName`)."""
        ref = ObjectRef(_ALL_NAMESPACES, "pods")
        with _translated_errors(ref, "list", resource="pods"):
            body = _read(
                _open(
                    self._core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={node}",
                    request_timeout=request_timeout,
                )
            )
        return _object_list(ref, body)

    def evict_pod(self, ref: ObjectRef, *, request_timeout: RequestTimeout) -> None:
        """Ask the Eviction API (policy/v1) to evict the pod: `EvictionRefused` while a
        PodDisruptionBudget forbids it, `ObjectMissing` when the pod is gone."""
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": ref.name, "namespace": ref.namespace},
        }
        with _eviction_errors(ref):
            _read(
                _open(
                    _as_is(self._core.create_namespaced_pod_eviction),
                    ref.name,
                    ref.namespace,
                    eviction,
                    request_timeout=request_timeout,
                )
            )


class ApiWatchStream:
    """One open watch response: iterate for events; `interrupt()` from any thread ends it."""

    def __init__(
        self, ref: ObjectRef, response: urllib3.BaseHTTPResponse, *, resource: str = "secrets"
    ) -> None:
        self._ref = ref
        self._response = response
        self._resource = resource

    def __iter__(self) -> Iterator[WatchEvent]:
        with _translated_errors(self._ref, "watch", resource=self._resource):
            for line in _lines(self._response.stream(None)):
                if line.strip():
                    yield _parse_event(self._ref, line, self._resource)

    def interrupt(self) -> None:
        # Shut the socket down rather than close it: the reading thread still owns it, and a
        # shutdown wakes its blocked read immediately.
        with suppress(AttributeError, OSError, RuntimeError, ValueError):
            shutdown = getattr(self._response, "shutdown", None)  # urllib3 >= 2.3
            if shutdown is not None:
                shutdown()
            else:
                self._response.connection.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

    def close(self) -> None:
        with suppress(OSError, urllib3.exceptions.HTTPError):
            self._response.close()
            self._response.release_conn()


def _as_is(method: Callable[..., object]) -> Callable[..., object]:
    """A generated API method without 37.x's argument validation, so that a dict body is sent
    exactly as given (see the module docstring); the method itself when it has none."""
    function = getattr(method, "raw_function", None)  # set by pydantic's validate_call
    owner = getattr(method, "__self__", None)
    if function is None or owner is None:
        return method
    return functools.partial(function, owner)


def _name_of(obj: Mapping[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return name if isinstance(name, str) and name else None


def _open(
    method: Callable[..., object],
    *args: object,
    request_timeout: RequestTimeout,
    **kwargs: object,
) -> urllib3.BaseHTTPResponse:
    """Call a generated API method for its raw answer (see the module docstring). The client
    annotates the model type even when `_preload_content=False` makes it return the urllib3
    response."""
    answer = method(*args, _preload_content=False, _request_timeout=request_timeout, **kwargs)
    return cast(urllib3.BaseHTTPResponse, answer)


def _watch_arguments(resource_version: str, timeout_seconds: int) -> dict[str, object]:
    return {
        "resource_version": resource_version,
        "allow_watch_bookmarks": True,
        "timeout_seconds": timeout_seconds,
        "watch": True,
    }


def _read(response: urllib3.BaseHTTPResponse) -> bytes:
    """The whole body of a raw answer; the connection goes back to the pool."""
    try:
        return response.data
    finally:
        response.release_conn()


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Newline-delimited records from a chunked body; a record may span chunks."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending.strip():
        yield pending


def _parse_json(ref: ObjectRef, raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise ApiInvalid(str(ref), "the API answered malformed JSON") from error
    if not isinstance(document, dict):
        raise ApiInvalid(str(ref), "the API answered JSON that is not an object")
    return document


def _object_list(ref: ObjectRef, raw: bytes) -> ObjectList:
    document = _parse_json(ref, raw)
    metadata = document.get("metadata")
    items = document.get("items") or []
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    if not isinstance(version, str) or not version or not isinstance(items, list):
        raise ApiInvalid(str(ref), "list answer without items or metadata.resourceVersion")
    return ObjectList(items=[i for i in items if isinstance(i, dict)], resource_version=version)


def _parse_event(ref: ObjectRef, line: bytes, resource: str) -> WatchEvent:
    document = _parse_json(ref, line)
    event_type, obj = document.get("type"), document.get("object")
    if not isinstance(event_type, str) or not isinstance(obj, dict):
        raise ApiInvalid(str(ref), "watch event without type or object")
    if event_type == "ERROR":
        raise _status_error(ref, "watch", _as_int(obj.get("code")), obj, resource)
    return WatchEvent(type=event_type, object=obj)


@contextmanager
def _translated_errors(ref: ObjectRef, verb: str, *, resource: str = "secrets") -> Iterator[None]:
    """Client and transport exceptions → the agent's own, with what to do about them.

    Event and Lease calls reuse the source error types: `reason` (forbidden, unreachable,
    invalid) is what their callers act on, and `source` names `namespace/object-name` (or
    `namespace/leases` for a list or watch) there."""
    try:
        yield
    except ApiException as error:
        status = _status_of(error)
        raise _status_error(ref, verb, _as_int(error.status), status, resource) from error
    except (urllib3.exceptions.HTTPError, OSError) as error:
        problem = f"{verb} {resource}: cannot reach the API server ({_describe(error)})"
        raise ApiUnavailable(str(ref), problem) from error


@contextmanager
def _lease_errors(ref: ObjectRef, verb: str) -> Iterator[None]:
    """Like `_translated_errors`, plus the answers optimistic concurrency expects: 409 as
    `ApiConflict`, and 404 on an update as `ObjectMissing`."""
    with _translated_errors(ref, verb, resource="leases"):
        try:
            yield
        except ApiException as error:
            status = _status_of(error)
            message = bounded(str(status.get("message") or ""), _STATUS_MESSAGE_LIMIT)
            if error.status == 409:
                already_exists = status.get("reason") == "AlreadyExists"
                problem = (
                    "the Lease already exists"
                    if already_exists
                    else "the Lease changed since it was read"
                )
                raise ApiConflict(
                    str(ref),
                    f"{verb} leases: {problem} (409: {message})",
                    already_exists=already_exists,
                ) from error
            if error.status == 404 and verb == "update":
                raise ObjectMissing(
                    str(ref), f"{verb} leases: the Lease no longer exists (404: {message})"
                ) from error
            raise


@contextmanager
def _eviction_errors(ref: ObjectRef) -> Iterator[None]:
    """Like `_translated_errors`, plus what an eviction answers routinely: 429 (a disruption
    budget says not now) as `EvictionRefused`, 404 (the pod is gone) as `ObjectMissing`."""
    with _translated_errors(ref, "create", resource="pods/eviction"):
        try:
            yield
        except ApiException as error:
            message = str(_status_of(error).get("message") or "")[:_STATUS_MESSAGE_LIMIT]
            if error.status == 429:
                raise EvictionRefused(str(ref), f"eviction refused (429: {message})") from error
            if error.status == 404:
                problem = f"the pod no longer exists (404: {message})"
                raise ObjectMissing(str(ref), problem) from error
            raise


def _status_error(
    ref: ObjectRef, verb: str, code: int, status: Mapping[str, Any], resource: str = "secrets"
) -> NodeAgentError:
    message = bounded(
        str(status.get("message") or status.get("reason") or ""), _STATUS_MESSAGE_LIMIT
    )
    if code == 410:
        return WatchExpired(str(ref), f"{verb} {resource}: resourceVersion expired ({message})")
    if code == 401:
        return ApiForbidden(
            str(ref),
            f"{verb} {resource}: the API server rejected the agent's credentials (401): check "
            "its ServiceAccount token or kubeconfig",
        )
    if code == 403:
        return ApiForbidden(
            str(ref),
            f"RBAC forbids {verb} on {resource} in namespace {ref.namespace} (403): allow the "
            f"agent's ServiceAccount to {_needed_permission(ref, resource)} "
            f"(API server: {message})",
        )
    return ApiUnavailable(str(ref), f"{verb} {resource}: API answered {code} ({message})")


def _needed_permission(ref: ObjectRef, resource: str) -> str:
    """What to grant, and where."""
    if resource == "events":
        return "create and patch events there"
    if resource == "leases":
        return f"get, list, watch, create and update leases in namespace {ref.namespace}"
    if resource in ("pods", "pods/eviction"):
        return (
            "list and watch pods and create pods/eviction cluster-wide "
            "(daemonset/stuck-pod-recovery)"
        )
    return f"get, list and watch Secret {ref.name!r} there"


def _status_of(error: ApiException) -> Mapping[str, Any]:
    """The Status object of an error answer, if its body is one (it never holds data)."""
    try:
        status = json.loads(error.body or "")
    except (TypeError, ValueError):
        return {"reason": str(error.reason or "")}
    return status if isinstance(status, dict) else {}


def _as_int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _describe(error: BaseException) -> str:
    """urllib3's own words (host, port, what broke); they never contain response data, and
    a URL's `user:password@` is taken out."""
    text = without_url_userinfo(f"{type(error).__name__}: {error}")
    return bounded(text, _STATUS_MESSAGE_LIMIT)
