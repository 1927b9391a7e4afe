"""Kubernetes Events on the Node: what the agent did, visible in `kubectl describe node`.

Events are best-effort. `record()` only queues; one background thread delivers, so a slow or
unreachable API server never delays a reconcile (with a synchronous call, a black-holed API
would hold the worker for the whole connect timeout). The queue is bounded: when it is full,
new events are dropped. A failed delivery is dropped too, and logged once per kind of failure
(again after `_RELOG_INTERVAL` if it persists), never raised.

Deduplication, like the kubelet's event correlator: the same (type, reason, message) seen
again within `dedupe_window` seconds of its last occurrence bumps `count` and `lastTimestamp`
of the Event already posted (a merge patch) instead of creating another. Posted Events are
remembered in a small LRU cache; an Event the API server has since expired (PATCH answers
404) is created again. Names come from `generateName` (`<node>.`), so a restarted agent never
collides with the Events of its previous run.

Messages name registries and files, never credential values: callers build them, and this
module sends them as given (cut at a word to `_MESSAGE_LIMIT` characters, saying how many
more there were).
"""

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from node_agent.escaping import bounded, printable
from node_agent.kube.errors import ApiError
from node_agent.kube.model import EventApi, ObjectRef, RequestTimeout

log = logging.getLogger(__name__)

EventType = Literal["Normal", "Warning"]

_MESSAGE_LIMIT = 1024  # what `kubectl describe` can still show; events.k8s.io caps notes at 1 kB
_RELOG_INTERVAL = timedelta(minutes=10)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Occurrence:
    """One call of `record()`, waiting for delivery."""

    type: EventType
    reason: str
    message: str
    at: datetime

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.type, self.reason, self.message)


@dataclass
class _Posted:
    """An Event the API server holds, as far as this recorder knows."""

    name: str
    count: int
    last_seen: datetime


class NodeEventRecorder:
    """Records Events about one Node, deduplicated, delivered by a background thread.

    The thread starts with the first `record()`; `close()` delivers what is queued (within
    its timeout) and ends it. Node Events belong in the `default` namespace: the API server
    rejects events about cluster-scoped objects anywhere else.
    """

    def __init__(
        self,
        api: EventApi,
        *,
        node_name: str,
        namespace: str = "default",
        component: str = "node-agent",
        clock: Callable[[], datetime] = utc_now,
        dedupe_window: float = 600.0,
        cache_size: int = 64,
        max_pending: int = 64,
        request_timeout: RequestTimeout = (5.0, 10.0),
    ) -> None:
        self._api = api
        self._node_name = node_name
        self._namespace = namespace
        self._component = component
        self._clock = clock
        self._window = timedelta(seconds=dedupe_window)
        self._cache_size = cache_size
        self._max_pending = max_pending
        self._request_timeout = request_timeout
        # Shared with the delivery thread, under `_changed`:
        self._changed = threading.Condition()
        self._pending: deque[_Occurrence] = deque()
        self._delivering = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._overflowing = False
        # Owned by the delivery thread alone:
        self._posted: OrderedDict[tuple[str, str, str], _Posted] = OrderedDict()
        self._failing: str | None = None
        self._failure_logged_at: datetime | None = None
        self._lost = 0

    # the caller's side

    def record(self, reason: str, message: str, *, type: EventType = "Normal") -> None:
        """Queue an Event about the Node; returns at once and never raises."""
        try:
            occurrence = _Occurrence(
                type, reason, bounded(printable(message), _MESSAGE_LIMIT), self._clock()
            )
            self._enqueue(occurrence)
        except Exception:
            # An event is never worth breaking the caller (a reconcile) for.
            log.exception("Node events: could not queue event %s", reason)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far was delivered or dropped; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._pending and not self._delivering, timeout
            )

    def close(self, timeout: float = 2.0) -> bool:
        """Deliver what is queued, then end the thread; False if it was still busy at the
        timeout (it is a daemon thread and never holds up the process's exit)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _enqueue(self, occurrence: _Occurrence) -> None:
        with self._changed:
            if self._closed:
                log.debug("Node events: closed, dropping %s", occurrence.reason)
                return
            if len(self._pending) >= self._max_pending:
                self._on_overflow(occurrence)
                return
            if not self._pending:
                self._overflowing = False  # the backlog cleared: a new overflow is news again
            self._pending.append(occurrence)
            self._start_thread()
            self._changed.notify_all()

    def _on_overflow(self, occurrence: _Occurrence) -> None:
        if not self._overflowing:
            log.warning(
                "Node events: %d events wait for the API server; dropping new ones",
                len(self._pending),
            )
        self._overflowing = True
        log.debug("Node events: queue full, dropping %s", occurrence.reason)

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="node-events", daemon=True)
            self._thread.start()

    # the delivery thread

    def _run(self) -> None:
        while (occurrence := self._next()) is not None:
            self._deliver(occurrence)
            with self._changed:
                self._delivering = False
                self._changed.notify_all()

    def _next(self) -> _Occurrence | None:
        """The next occurrence to deliver; None once closed and drained."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending or self._closed)
            if not self._pending:
                return None
            self._delivering = True
            return self._pending.popleft()

    def _deliver(self, occurrence: _Occurrence) -> None:
        try:
            if not self._bump_posted(occurrence):
                self._create(occurrence)
        except Exception as error:
            self._on_failure(error, occurrence.at)
        else:
            self._on_success()

    def _bump_posted(self, occurrence: _Occurrence) -> bool:
        """Count the occurrence on the Event already posted for it; False if there is none
        (never posted, outside the window, or expired on the server)."""
        posted = self._posted.get(occurrence.key)
        if posted is None or occurrence.at - posted.last_seen > self._window:
            return False
        patch = {"count": posted.count + 1, "lastTimestamp": _timestamp(occurrence.at)}
        ref = ObjectRef(self._namespace, posted.name)
        if self._api.patch_event(ref, patch, request_timeout=self._request_timeout) is None:
            log.debug("Node events: %s expired on the server, creating it again", posted.name)
            del self._posted[occurrence.key]
            return False
        posted.count += 1
        posted.last_seen = occurrence.at
        self._posted.move_to_end(occurrence.key)
        return True

    def _create(self, occurrence: _Occurrence) -> None:
        created = self._api.create_event(
            self._namespace, self._event(occurrence), request_timeout=self._request_timeout
        )
        self._posted[occurrence.key] = _Posted(_name_of(created), 1, occurrence.at)
        self._posted.move_to_end(occurrence.key)
        while len(self._posted) > self._cache_size:
            self._posted.popitem(last=False)

    def _event(self, occurrence: _Occurrence) -> dict[str, Any]:
        """A core/v1 Event as the kubelet would write it about its Node."""
        node, at = self._node_name, _timestamp(occurrence.at)
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{node}.", "namespace": self._namespace},
            # The kubelet uses the node name as the uid of its Node in events, too.
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
            "reason": occurrence.reason,
            "message": occurrence.message,
            "type": occurrence.type,
            "source": {"component": self._component, "host": node},
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
            "reportingComponent": self._component,
            "reportingInstance": f"{self._component}-{node}",
        }

    def _on_failure(self, error: Exception, at: datetime) -> None:
        try:
            self._log_failure(error, at)
        except Exception:
            # Even a failure to report a failure must not end the delivery thread.
            log.exception("Node events: delivery failed")

    def _log_failure(self, error: Exception, at: datetime) -> None:
        """Log once per kind of failure, again after `_RELOG_INTERVAL` (event time) if it lasts."""
        self._lost += 1
        kind = error.reason if isinstance(error, ApiError) else type(error).__name__
        logged_at = self._failure_logged_at
        if kind == self._failing and logged_at is not None and at - logged_at < _RELOG_INTERVAL:
            log.debug("Node events: still failing (%s)", error)
            return
        self._failing, self._failure_logged_at = kind, at
        log.log(
            logging.ERROR if kind == "forbidden" else logging.WARNING,
            "Node events: %s; events are dropped until the API server accepts them "
            "(%d dropped so far)",
            error,
            self._lost,
            exc_info=not isinstance(error, ApiError),  # not the API's fault: show where
        )

    def _on_success(self) -> None:
        if self._failing is not None:
            log.info("Node events: delivered again (%d dropped meanwhile)", self._lost)
        self._failing, self._lost = None, 0


def _timestamp(at: datetime) -> str:
    """RFC 3339 in UTC, whole seconds: the format of core/v1 `firstTimestamp`."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _name_of(event: Mapping[str, Any]) -> str:
    metadata = event.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("the API answered a created Event without metadata.name")
    return name


def pod_event(
    pod: ObjectRef,
    *,
    uid: str,
    reason: str,
    message: str,
    type: EventType,
    node: str,
    at: datetime,
    component: str = "node-agent",
) -> dict[str, Any]:
    """A core/v1 Event about a pod, for its namespace (`kubectl describe pod` shows it). The
    message is made printable and shortened like the Node Events'."""
    timestamp = _timestamp(at)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{pod.name}.", "namespace": pod.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": pod.namespace,
            "name": pod.name,
            "uid": uid,
        },
        "reason": reason,
        "message": printable(message)[:_MESSAGE_LIMIT],
        "type": type,
        "source": {"component": component, "host": node},
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
        "reportingComponent": component,
        "reportingInstance": f"{component}-{node}",
    }
