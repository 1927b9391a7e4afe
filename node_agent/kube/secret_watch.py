"""Follow one Secret through the Kubernetes API: list it, then watch it, forever.

The loop (docs/node-facts.md#kubernetes-client):

1. List with field selector `metadata.name=NAME`: the Secret (or its confirmed absence) and a
   resourceVersion to watch from.
2. Watch from that resourceVersion with bookmarks and a server-side timeout. Every event,
   bookmarks included, advances the resourceVersion, so a resumed watch misses nothing.
3. The server ends the watch cleanly (timeout) → resume from the last resourceVersion.
   410 Gone (history compacted) → back to 1: only a list tells what the watch missed.
   Anything else (403, 5xx, refused, reset, a stalled stream) → exponential backoff with full
   jitter, reset once a watch proves healthy, then resume (or relist if never listed).

What it reports:
- `on_change(SecretSnapshot)` only when the content differs from the last report. A snapshot
  is "deleted" only when the API confirms it: a DELETED event, or a successful list without
  the Secret. Errors and outages never report anything but `on_error`, so the node keeps the
  last applied credentials.
- `on_error(reason)` per failed attempt, reason in `errors.ErrorReason`;
  `on_watch_restart(cause)` each time a watch ends and is reopened.

Secret data is never logged: snapshots show their keys, not their values.
"""

import base64
import binascii
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from node_agent.backoff import Backoff
from node_agent.kube.errors import ApiError, ApiInvalid, ErrorReason, WatchExpired
from node_agent.kube.model import (
    EventStream,
    ObjectRef,
    SecretApi,
    WatchEvent,
    resource_version_of,
)

log = logging.getLogger(__name__)

RestartCause = Literal["timeout", "expired", "error"]
"""Why a watch ended: the server's clean timeout, 410 Gone, or a failure."""

_EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK"})
_T = TypeVar("_T")


@dataclass(frozen=True)
class SecretContent:
    """What a Secret holds: its type and its data, base64-decoded."""

    type: str
    data: Mapping[str, bytes] = field(repr=False)

    def __repr__(self) -> str:
        return f"SecretContent(type={self.type!r}, keys={sorted(self.data)})"


@dataclass(frozen=True)
class SecretSnapshot:
    """The Secret as the API last confirmed it; `content` None means it does not exist."""

    content: SecretContent | None
    resource_version: str

    @property
    def deleted(self) -> bool:
        return self.content is None


@dataclass(frozen=True)
class WatchSettings:
    """Timeouts and backoff of the list+watch loop. The defaults suit a real cluster."""

    watch_timeout_seconds: int = 300
    """Asked of the API server (`timeoutSeconds`): it ends each watch cleanly after this long
    and we resume from the last resourceVersion. Whole seconds (the client insists)."""
    connect_timeout: float = 5.0
    """Seconds to connect to the API server, for lists and watches."""
    list_read_timeout: float = 30.0
    """Seconds to wait for a list's answer."""
    watch_read_timeout: float = 330.0
    """Seconds of silence on an open watch before it counts as stalled and is reopened. Longer
    than `watch_timeout_seconds`, so only a broken stream ever hits it."""
    backoff_initial: float = 1.0
    """Upper bound of the first retry delay, in seconds; it doubles per consecutive failure."""
    backoff_max: float = 60.0
    """Cap of the retry delay, in seconds."""


def secret_content(source: ObjectRef, obj: Mapping[str, Any]) -> SecretContent:
    """A Secret object's type and decoded data; ApiInvalid if the data is not base64."""
    raw = obj.get("data") or {}
    if not isinstance(raw, Mapping):
        raise ApiInvalid(str(source), "Secret data is not a mapping")
    decoded: dict[str, bytes] = {}
    for key, value in raw.items():
        try:
            decoded[str(key)] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as error:
            raise ApiInvalid(str(source), f"Secret data key {key!r} is not base64") from error
    return SecretContent(type=str(obj.get("type") or "Opaque"), data=MappingProxyType(decoded))


def _ignore(_: object) -> None:
    """The default for callbacks nobody listens to."""


class SecretWatcher:
    """Follows `namespace/name` and reports changes; `start()`/`stop()` or `run()` blocking.

    Callbacks run on the watcher's thread and should only hand work over (enqueue).
    `sleep` waits between retries; the default is interrupted by `stop()`.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        *,
        api: SecretApi,
        on_change: Callable[[SecretSnapshot], None],
        on_error: Callable[[ErrorReason], None] = _ignore,
        on_watch_restart: Callable[[RestartCause], None] = _ignore,
        settings: WatchSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.ref = ObjectRef(namespace, name)
        self._api = api
        self._on_change = on_change
        self._on_error = on_error
        self._on_watch_restart = on_watch_restart
        self._settings = settings or WatchSettings()
        self._clock = clock
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._backoff = Backoff(
            initial=self._settings.backoff_initial,
            maximum=self._settings.backoff_max,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not cryptography
        )
        self._lock = threading.Lock()
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None
        self._resource_version: str | None = None
        self._fresh_from_list = False  # the current watch started from a list, no event yet
        self._has_reported = False
        self._reported: SecretContent | None = None
        self._failing: ErrorReason | None = None

    # lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"secret-watch {self.ref}")
        self._thread.daemon = True
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop following; returns once the loop has ended (True) or after `timeout` (False)."""
        self._stopping.set()
        with self._lock:
            if self._stream is not None:
                self._stream.interrupt()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def run(self) -> None:
        """The loop; returns after `stop()`."""
        log.info("following Secret %s through the Kubernetes API", self.ref)
        while not self._stopping.is_set():
            must_wait = self._attempt()
            if must_wait and not self._stopping.is_set():
                self._sleep(self._backoff.next_delay())
        log.info("stopped following Secret %s", self.ref)

    # one round

    def _attempt(self) -> bool:
        """List if needed, then watch until the stream ends. True: back off before the next."""
        try:
            if self._resource_version is None:
                self._list()
            healthy = self._watch()
        except WatchExpired as expired:
            return self._on_expired(expired)
        except ApiError as error:
            if not self._stopping.is_set():
                self._on_failure(error)
            return True
        return not healthy

    def _list(self) -> None:
        settings = self._settings
        listing = self._api.list_secret(
            self.ref, request_timeout=(settings.connect_timeout, settings.list_read_timeout)
        )
        self._recovered()
        item = next((i for i in listing.items if _name_of(i) == self.ref.name), None)
        content = None if item is None else secret_content(self.ref, item)
        self._report(content, listing.resource_version)
        self._resource_version = listing.resource_version
        self._fresh_from_list = True

    def _watch(self) -> bool:
        """Follow one watch stream to its clean end; True if it proved healthy."""
        assert self._resource_version is not None
        settings = self._settings
        stream = self._api.watch_secret(
            self.ref,
            resource_version=self._resource_version,
            timeout_seconds=settings.watch_timeout_seconds,
            request_timeout=(settings.connect_timeout, settings.watch_read_timeout),
        )
        opened_at = self._clock()
        with self._lock:
            self._stream = stream
        if self._stopping.is_set():  # stop() came before the stream was visible to it
            stream.interrupt()
        events = 0
        ended_by: RestartCause = "error"
        try:
            for event in stream:
                self._apply(event)
                events += 1
            ended_by = "timeout"
        except WatchExpired:
            ended_by = "expired"
            raise
        finally:
            with self._lock:
                self._stream = None
            stream.close()
            if not self._stopping.is_set():
                self._notify(self._on_watch_restart, ended_by)
        # A stream that ends at once with nothing in it must not turn into a hot loop.
        return events > 0 or self._clock() - opened_at >= settings.watch_timeout_seconds / 2

    def _apply(self, event: WatchEvent) -> None:
        if event.type not in _EVENT_TYPES:
            raise ApiInvalid(str(self.ref), f"unknown watch event type {event.type!r}")
        version = resource_version_of(self.ref, event.object)
        if event.type != "BOOKMARK" and event.name == self.ref.name:
            deleted = event.type == "DELETED"
            self._report(None if deleted else secret_content(self.ref, event.object), version)
        self._resource_version = version
        self._fresh_from_list = False
        self._backoff.reset()  # the stream works: the next failure starts from a short delay
        self._recovered()

    # outcomes

    def _on_expired(self, expired: WatchExpired) -> bool:
        """410: relist at once, unless the watch had just been started from a list (then the
        server keeps answering 410 to fresh versions, and relisting at once would spin)."""
        log.info("Secret %s: watch history expired, listing again (%s)", self.ref, expired)
        spinning = self._fresh_from_list
        self._resource_version = None
        return spinning

    def _on_failure(self, error: ApiError) -> None:
        if error.reason != self._failing:
            level = logging.ERROR if error.reason == "forbidden" else logging.WARNING
            log.log(
                level,
                "Secret %s: %s; keeping the last applied credentials",
                self.ref,
                error.problem,
            )
        else:
            log.debug("Secret %s: still failing: %s", self.ref, error.problem)
        self._failing = error.reason
        if isinstance(error, ApiInvalid):
            self._resource_version = None  # what we hold may be inconsistent: list again
        self._notify(self._on_error, error.reason)

    def _recovered(self) -> None:
        if self._failing is not None:
            log.info("Secret %s: the Kubernetes API answers again", self.ref)
            self._failing = None

    def _report(self, content: SecretContent | None, resource_version: str) -> None:
        if self._has_reported and content == self._reported:
            return
        self._has_reported, self._reported = True, content
        snapshot = SecretSnapshot(content, resource_version)
        log.info(
            "Secret %s: %s at resourceVersion %s", self.ref, _describe(content), resource_version
        )
        self._notify(self._on_change, snapshot)

    def _notify(self, callback: Callable[[_T], None], value: _T) -> None:
        """Run a callback; a failing one is logged and must not end the loop."""
        try:
            callback(value)
        except Exception:
            log.exception("Secret %s: a watch callback failed", self.ref)


def _name_of(obj: Mapping[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    return metadata.get("name") if isinstance(metadata, Mapping) else None


def _describe(content: SecretContent | None) -> str:
    if content is None:
        return "does not exist"
    return f"type {content.type}, keys {sorted(content.data)}"
