"""A small Kubernetes API server for tests: real HTTP on 127.0.0.1, real resourceVersions.

The official `kubernetes` client talks to it unmodified, through the kubeconfig file the
server writes (plain `http://127.0.0.1:PORT`, a bearer token it checks).

What it models, because node-agent's correctness depends on it:

- One global, monotonically increasing resourceVersion over every object, like etcd's revision.
- A bounded history of changes. A watch from a resourceVersion older than the history (after
  `compact()` or overflow) is answered like the real API server does: HTTP 200 and one watch
  event `{"type": "ERROR", "object": Status{code: 410, reason: "Expired"}}` (the apiserver's
  cacher returns errors *inside* the stream once authz passed). A list with a stale `continue`
  token is answered with a plain HTTP 410.
- Watches with `resourceVersion`, `timeoutSeconds` (clean end of the chunked stream),
  `allowWatchBookmarks` (a BOOKMARK every `bookmark_interval` seconds) and `fieldSelector`.
- Generic kinds (`Kind`): core/v1 secrets and events and coordination.k8s.io/v1 leases are
  registered (`register_kind` adds more). Optimistic concurrency like etcd's: a create of an
  existing name answers 409 reason AlreadyExists, a create carrying a resourceVersion 500, a
  PUT with a stale `metadata.resourceVersion` 409 reason Conflict, a PUT without one
  overwrites unconditionally (allowed for every kind served here, Leases included).
- Lease decoding and validation where an agent's mistake would be refused by a real cluster:
  `acquireTime`/`renewTime` must be MicroTime (`2006-01-02T15:04:05.000000Z07:00`: exactly six
  fraction digits) and `leaseDurationSeconds`/`leaseTransitions` JSON integers (else 400);
  `leaseDurationSeconds` > 0 and `leaseTransitions` >= 0 (else 422).

The restart-slot audit (`RestartSlotAudit`, `slot_audit`): every stored change of a Lease named
`node-agent-restart-*` lands in a timeline (`slot_timeline()`: server monotonic time, name, old
and new holder, acquire/renew/release/takeover/free/delete) and is checked: one holder never
holds two slots; a holder changes from A to B only after the Lease stayed unchanged for its
`leaseDurationSeconds` on the server's clock (`clock=`, injectable); optionally at most
`max_holders` slots held per namespace. Any Lease updated without a resourceVersion or patched
is recorded too. Violations never change an answer; `violations()` lists them and the
`kube_api` fixture fails the test that leaves any (`clear_violations()` after asserting on
them). `leases()`, `lease()`, `release_lease()` (an operator freeing a slot), `delete_lease()`.

Pods (core/v1) for stuck-pod recovery: `create_pod` makes a pod bound to a node with one
container (and optionally an init container), its status waiting on a pull failure or
running, owned by a controller or by nothing; list and watch across namespaces
(`/api/v1/pods`) honour the `spec.nodeName` field selector like any field. The `eviction`
subresource (POST `/api/v1/namespaces/NS/pods/NAME/eviction`, request log plural
`pods/eviction`) deletes the pod and answers 201, or 429 TooManyRequests while
`forbid_eviction` (a PodDisruptionBudget that allows no disruption) has refusals left for
it; `evictions()` lists the pods evicted, in order.

What it does not model: list `resourceVersion`/`resourceVersionMatch` semantics (a list always
reads the latest state), consistent snapshots across `continue` pages, label selectors
(ignored), who sent a request (one token for every client), admission and validation beyond
what the agent needs.

Faults, for tests of the agent's robustness: `fail_next` (answer the next N requests with a
status), `drop_watches` (abrupt TCP close of every open watch), `stall_watches` (keep the
connections open, send nothing more), `outage` (close every connection, accept none),
`compact` (forget history, so old resourceVersions get 410). `requests()` is the request log.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import secrets as token_generator
import select
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

JsonObject = dict[str, Any]

TOKEN = "node-agent-test-token"
USER = "system:serviceaccount:kube-system:node-agent"

# How often a watch handler wakes up to notice a vanished client, a drop or a shutdown.
_WATCH_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Kind:
    """One API resource the server can store; everything else about it is generic."""

    group: str
    """API group; "" for the core group (served under /api/v1)."""
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


SECRETS = Kind("", "v1", "secrets", "Secret")
EVENTS = Kind("", "v1", "events", "Event")
LEASES = Kind("coordination.k8s.io", "v1", "leases", "Lease")
PODS = Kind("", "v1", "pods", "Pod")

#: Subresources served, by plural: POST only.
_SUBRESOURCES = {"pods": ("eviction",)}

_STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class ApiError(Exception):
    """An error the server answers with a Status object."""

    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _STATUS_REASONS.get(code, "Unknown")

    def status(self) -> JsonObject:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it (before any injected fault)."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str
    """get | list | watch | create | update | patch | delete | unknown"""
    plural: str | None


@dataclass
class _Fault:
    code: int
    remaining: int | None  # None: until clear_faults()
    verb: str | None
    message: str | None = None  # the Status message; None: one like the real server's


@dataclass(frozen=True)
class _Change:
    resource_version: int
    plural: str
    namespace: str
    type: str  # ADDED | MODIFIED | DELETED
    object: JsonObject


@dataclass
class _Connection:
    sock: socket.socket
    watching: bool = False
    stalled: bool = False
    dropped: bool = False


@dataclass(frozen=True)
class _Route:
    kind: Kind
    namespace: str | None
    name: str | None
    subresource: str | None = None

    @property
    def plural(self) -> str:
        """What the request log calls the resource: `pods/eviction` for a subresource."""
        return self.kind.plural + (f"/{self.subresource}" if self.subresource else "")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Validator = Callable[[Kind, JsonObject], None]
"""Checks an object about to be stored; raises ApiError (400, 422) to refuse it."""

ChangeObserver = Callable[[Kind, str, str, JsonObject | None, JsonObject | None], None]
"""Told of every stored change: kind, namespace, name, old object (None: created), new object
(None: deleted). Called under the store's lock, after the change got its resourceVersion."""


class ObjectStore:
    """Objects of every kind, one resourceVersion counter, a bounded change history."""

    def __init__(
        self,
        *,
        history_limit: int,
        validate: Validator | None = None,
        on_change: ChangeObserver | None = None,
    ) -> None:
        self.changed = threading.Condition()
        self._objects: dict[tuple[str, str, str], JsonObject] = {}
        self._history: deque[_Change] = deque()
        self._history_limit = history_limit
        self._revision = 0
        self._compacted_revision = 0
        self._validate = validate
        self._on_change = on_change

    @property
    def revision(self) -> int:
        with self.changed:
            return self._revision

    def get(self, kind: Kind, namespace: str, name: str) -> JsonObject:
        with self.changed:
            return copy.deepcopy(self._require(kind, namespace, name))

    def items(self, kind: Kind, namespace: str | None) -> tuple[list[JsonObject], int]:
        with self.changed:
            items = [
                copy.deepcopy(obj)
                for (plural, ns, _), obj in sorted(self._objects.items())
                if plural == kind.plural and namespace in (None, ns)
            ]
            return items, self._revision

    def create(self, kind: Kind, namespace: str, obj: JsonObject) -> JsonObject:
        metadata = obj.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + token_generator.token_hex(3)
        name = metadata.get("name")
        if not name:
            raise ApiError(422, f"{kind.kind} is invalid: metadata.name: Required value")
        if metadata.get("resourceVersion"):
            # etcd3 store: a plain error, so the API server answers 500 InternalError.
            raise ApiError(500, "resourceVersion should not be set on objects to be created")
        with self.changed:
            if (kind.plural, namespace, name) in self._objects:
                raise ApiError(
                    409, f'{kind.plural} "{name}" already exists', reason="AlreadyExists"
                )
            metadata.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now())
            obj.update(apiVersion=kind.api_version, kind=kind.kind)
            return self._commit(kind, namespace, name, obj, "ADDED")

    def replace(self, kind: Kind, namespace: str, name: str, obj: JsonObject) -> JsonObject:
        with self.changed:
            current = self._require(kind, namespace, name)
            expected = obj.get("metadata", {}).get("resourceVersion")
            if expected and expected != current["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    f'Operation cannot be fulfilled on {kind.plural} "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                )
            merged = copy.deepcopy(obj)
            metadata = merged.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp", "namespace", "name"):
                metadata[kept] = current["metadata"][kept]
            merged.update(apiVersion=kind.api_version, kind=kind.kind)
            return self._commit(kind, namespace, name, merged, "MODIFIED")

    def update(
        self, kind: Kind, namespace: str, name: str, change: Callable[[JsonObject], JsonObject]
    ) -> JsonObject:
        """Apply `change` to a copy of the stored object (a patch), atomically."""
        with self.changed:
            current = copy.deepcopy(self._require(kind, namespace, name))
            updated = change(current)
            updated["metadata"]["name"] = name
            updated["metadata"]["namespace"] = namespace
            return self._commit(kind, namespace, name, updated, "MODIFIED")

    def delete(self, kind: Kind, namespace: str, name: str) -> JsonObject:
        with self.changed:
            obj = self._require(kind, namespace, name)
            del self._objects[(kind.plural, namespace, name)]
            deleted = self._record(kind, namespace, copy.deepcopy(obj), "DELETED")
            if self._on_change is not None:
                self._on_change(kind, namespace, name, copy.deepcopy(obj), None)
            return deleted

    def compact(self) -> int:
        """Forget every change so far: a watch from an older resourceVersion now gets 410."""
        with self.changed:
            self._history.clear()
            self._compacted_revision = self._revision
            return self._revision

    def changes_since(
        self, kind: Kind, namespace: str | None, revision: int
    ) -> tuple[list[_Change], int]:
        """Changes after `revision` and the revision they reach up to (read atomically), or
        ApiError(410) when the history no longer reaches back that far."""
        with self.changed:
            self.require_history(revision)
            changes = [
                change
                for change in self._history
                if change.resource_version > revision
                and change.plural == kind.plural
                and namespace in (None, change.namespace)
            ]
            return changes, self._revision

    def require_history(self, revision: int) -> None:
        """Raise 410 Expired, worded like the API server, if `revision` was compacted."""
        with self.changed:
            if revision < self._compacted_revision:
                raise ApiError(
                    410, f"too old resource version: {revision} ({self._compacted_revision})"
                )

    def _require(self, kind: Kind, namespace: str, name: str) -> JsonObject:
        obj = self._objects.get((kind.plural, namespace, name))
        if obj is None:
            raise ApiError(404, f'{kind.plural} "{name}" not found')
        return obj

    def _commit(
        self, kind: Kind, namespace: str, name: str, obj: JsonObject, event_type: str
    ) -> JsonObject:
        if self._validate is not None:
            self._validate(kind, obj)
        old = self._objects.get((kind.plural, namespace, name))
        self._objects[(kind.plural, namespace, name)] = obj
        stored = self._record(kind, namespace, obj, event_type)
        if self._on_change is not None:
            self._on_change(kind, namespace, name, copy.deepcopy(old), copy.deepcopy(stored))
        return stored

    def _record(self, kind: Kind, namespace: str, obj: JsonObject, event_type: str) -> JsonObject:
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        if len(self._history) >= self._history_limit:
            self._compacted_revision = self._history.popleft().resource_version
        snapshot = copy.deepcopy(obj)
        self._history.append(_Change(self._revision, kind.plural, namespace, event_type, snapshot))
        self.changed.notify_all()
        return copy.deepcopy(obj)


# --- selectors and patches ---------------------------------------------------------------


def _field_value(obj: JsonObject, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def parse_field_selector(selector: str) -> Callable[[JsonObject], bool]:
    """`a.b=x,c!=y` (also `==`) as a predicate over objects; only AND of terms, like the API."""
    terms: list[tuple[str, str, bool]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            path, value = term.split("!=", 1)
            terms.append((path, value, False))
        elif "=" in term:
            path, value = term.replace("==", "=", 1).split("=", 1)
            terms.append((path, value, True))
        else:
            raise ApiError(400, f'invalid selector: "{selector}"')
    return lambda obj: all((_field_value(obj, p) == v) == eq for p, v, eq in terms)


_MERGE_PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge behaves the same for the fields we use)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: JsonObject, operations: list[JsonObject]) -> JsonObject:
    """RFC 6902 add/replace/remove/test on object paths (no array indices needed here)."""
    for operation in operations:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]
        ]
        node = target
        for part in parents:
            node = node.setdefault(part, {})
        op = operation["op"]
        if op in ("add", "replace"):
            node[last] = operation["value"]
        elif op == "remove":
            node.pop(last, None)
        elif op == "test" and node.get(last) != operation["value"]:
            raise ApiError(422, f"test operation failed at {operation['path']}")
    return target


# --- Leases and the restart-slot audit ----------------------------------------------------

RESTART_SLOT_PREFIX = "node-agent-restart-"
"""Leases named like this are node-agent's restart slots, which the audit watches."""

# metav1.MicroTime is parsed with Go's layout "2006-01-02T15:04:05.000000Z07:00": exactly six
# fraction digits, then Z or an offset. Anything else fails JSON decoding: 400.
_MICRO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})")
_MICRO_TIME_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"


def validate_lease(kind: Kind, obj: JsonObject) -> None:
    """The API server's decoding and validation of a Lease's spec, as far as the agent's
    mistakes could reach: MicroTime layout, integer fields, positive durations."""
    if kind != LEASES:
        return
    spec = obj.get("spec") or {}
    undecodable = 'Lease in version "v1" cannot be handled as a Lease: '
    if not isinstance(spec, dict):
        raise ApiError(400, undecodable + "json: cannot unmarshal into Go struct field Lease.spec")
    for field in ("acquireTime", "renewTime"):
        value = spec.get(field)
        if value is not None and not (isinstance(value, str) and _MICRO_TIME.fullmatch(value)):
            raise ApiError(400, undecodable + f'parsing time "{value}" as "{_MICRO_TIME_LAYOUT}"')
    holder = spec.get("holderIdentity")
    if holder is not None and not isinstance(holder, str):
        raise ApiError(400, undecodable + "json: cannot unmarshal holderIdentity into string")
    name = obj.get("metadata", {}).get("name")
    for field, minimum in (("leaseDurationSeconds", 1), ("leaseTransitions", 0)):
        value = spec.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ApiError(
                400,
                undecodable + f"json: cannot unmarshal {json.dumps(value)} into Go struct field "
                f"LeaseSpec.spec.{field} of type int32",
            )
        if value < minimum:
            bound = "greater than 0" if minimum == 1 else "greater than or equal to 0"
            raise ApiError(
                422,
                f'Lease.coordination.k8s.io "{name}" is invalid: spec.{field}: Invalid value: '
                f"{value}: must be {bound}",
            )


def holder_of(lease: JsonObject | None) -> str:
    """`spec.holderIdentity`, "" when the Lease is free (or absent)."""
    spec = (lease or {}).get("spec")
    holder = spec.get("holderIdentity") if isinstance(spec, dict) else None
    return holder if isinstance(holder, str) else ""


@dataclass(frozen=True)
class SlotChange:
    """One stored change of a restart-slot Lease, on the server's monotonic clock."""

    at: float
    namespace: str
    name: str
    old_holder: str
    """"" when the slot was free or did not exist."""
    new_holder: str
    """"" when the slot is now free or deleted."""
    kind: str
    """acquire | renew | release | takeover | free (changed while free) | delete"""
    resource_version: str
    """Of the change (for a deletion: of the deletion)."""


class RestartSlotAudit:
    """Checks every stored change of a Lease named `node-agent-restart-*` against the rules
    of fleet-safe restarts, and records what the agent must never do with Leases at all.

    A violation is recorded, never answered: the server still answers as the real one would,
    so the agent's behaviour stays what it would be in a cluster. Violation texts:

    - `{holder} holds two restart slots at once: {ns}/{held} and {ns}/{name}`
    - `{ns}/{name} taken from {old} by {new} while still renewed: last changed {age:.3f}s ago,
      leaseDurationSeconds {ttl}` (or `..., without leaseDurationSeconds`)
    - `{count} restart slots held at once in {ns}, more than max_holders {max}: {holders}`
    - `update of lease {ns}/{name} without metadata.resourceVersion (unconditional)`
    - `patch of lease {ns}/{name} ({content type}): Leases change only by updates carrying the
      resourceVersion read`
    """

    def __init__(self, *, clock: Callable[[], float], max_holders: int | None = None) -> None:
        self.clock = clock
        self.max_holders = max_holders
        """When set: at most this many restart slots held at once per namespace."""
        self._lock = threading.Lock()
        self._holders: dict[tuple[str, str], str] = {}
        self._changed_at: dict[tuple[str, str], float] = {}
        self._timeline: list[SlotChange] = []
        self._violations: list[str] = []

    def violation(self, text: str) -> None:
        with self._lock:
            self._violations.append(text)

    def violations(self) -> list[str]:
        with self._lock:
            return list(self._violations)

    def clear_violations(self) -> None:
        with self._lock:
            self._violations.clear()

    def timeline(self, namespace: str | None = None) -> list[SlotChange]:
        with self._lock:
            return [c for c in self._timeline if namespace in (None, c.namespace)]

    def observe(
        self, kind: Kind, namespace: str, name: str, old: JsonObject | None, new: JsonObject | None
    ) -> None:
        """The store's change observer (called under the store's lock, so changes arrive in
        resourceVersion order)."""
        if kind != LEASES or not name.startswith(RESTART_SLOT_PREFIX):
            return
        now = self.clock()
        key = (namespace, name)
        old_holder, new_holder = holder_of(old), holder_of(new)
        change_kind = _slot_change_kind(old_holder, new_holder, deleted=new is None)
        with self._lock:
            if change_kind == "takeover":
                self._check_expired(namespace, name, old, old_holder, new_holder, now)
            if change_kind in ("acquire", "takeover"):
                self._check_one_slot_per_holder(namespace, name, new_holder)
            if new_holder:
                self._holders[key] = new_holder
            else:
                self._holders.pop(key, None)
            if change_kind == "acquire":
                self._check_max_holders(namespace)
            self._changed_at[key] = now
            version = str(((new or old or {}).get("metadata") or {}).get("resourceVersion", ""))
            self._timeline.append(
                SlotChange(now, namespace, name, old_holder, new_holder, change_kind, version)
            )

    def _check_expired(
        self,
        namespace: str,
        name: str,
        old: JsonObject | None,
        old_holder: str,
        new_holder: str,
        now: float,
    ) -> None:
        age = now - self._changed_at.get((namespace, name), now)
        ttl = ((old or {}).get("spec") or {}).get("leaseDurationSeconds")
        prefix = f"{namespace}/{name} taken from {old_holder} by {new_holder} while still renewed"
        if not isinstance(ttl, int):
            self._violations.append(
                f"{prefix}: last changed {age:.3f}s ago, without leaseDurationSeconds"
            )
        elif age < ttl:
            self._violations.append(
                f"{prefix}: last changed {age:.3f}s ago, leaseDurationSeconds {ttl}"
            )

    def _check_one_slot_per_holder(self, namespace: str, name: str, holder: str) -> None:
        for (ns, held), other in sorted(self._holders.items()):
            if ns == namespace and held != name and other == holder:
                self._violations.append(
                    f"{holder} holds two restart slots at once: {ns}/{held} and {ns}/{name}"
                )

    def _check_max_holders(self, namespace: str) -> None:
        held = sorted(h for (ns, _), h in self._holders.items() if ns == namespace)
        if self.max_holders is not None and len(held) > self.max_holders:
            self._violations.append(
                f"{len(held)} restart slots held at once in {namespace}, more than "
                f"max_holders {self.max_holders}: {', '.join(held)}"
            )


def _slot_change_kind(old_holder: str, new_holder: str, *, deleted: bool) -> str:
    if deleted:
        return "delete"
    if not old_holder:
        return "acquire" if new_holder else "free"
    if not new_holder:
        return "release"
    return "renew" if new_holder == old_holder else "takeover"


# --- HTTP -----------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    api: KubeApiServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client vanishing mid-response is normal for a watch; anything else is a bug in
        # this test server and fails the test at teardown (see KubeApiServer.unexpected_errors).
        import sys

        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            self.api.unexpected_errors.append(repr(error))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without it, answers on a reused connection wait ~40 ms for Nagle + delayed ACK.
    disable_nagle_algorithm = True
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr line; tests read `KubeApiServer.requests()`."""

    def handle(self) -> None:
        api = self.server.api
        connection = api._register(self.connection)
        try:
            if api.outage_active:
                api.refused_connections += 1
                return
            self._connection = connection
            super().handle()
        finally:
            api._unregister(self.connection)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        if api.outage_active:
            self.close_connection = True
            return
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        body = self._read_body()
        route = api._find_route(url.path)
        verb = _verb(method, route, query)
        api._record(RecordedRequest(method, url.path, query, verb, route.plural if route else None))
        try:
            self._authenticate()
            if route is None:
                raise ApiError(
                    404, f"the server could not find the requested resource ({url.path})"
                )
            api._inject_fault(verb, route.kind)
            self._serve(verb, route, query, body)
        except ApiError as error:
            self._answer_error(error, verb=verb)
        except OSError:
            self.close_connection = True

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authenticate(self) -> None:
        if self.headers.get("Authorization", "").lower() != f"bearer {TOKEN}":
            raise ApiError(401, "Unauthorized")

    def _serve(self, verb: str, route: _Route, query: Mapping[str, str], body: bytes) -> None:
        api = self.server.api
        if route.subresource == "eviction" and verb == "create":
            assert route.namespace is not None and route.name is not None
            self._answer(201, api._evict(route.namespace, route.name))
        elif route.subresource is not None:
            raise ApiError(405, f"{self.command} is not supported on {self.path}")
        elif verb == "watch":
            _WatchStream(self, api, route, query).serve()
        elif verb == "list":
            self._answer(200, api._list(route, query))
        elif verb == "get":
            assert route.namespace is not None and route.name is not None
            self._answer(200, api.store.get(route.kind, route.namespace, route.name))
        elif verb == "create":
            assert route.namespace is not None
            self._answer(201, api.store.create(route.kind, route.namespace, _json(body)))
        elif verb == "update":
            assert route.namespace is not None and route.name is not None
            obj = _json(body)
            if route.kind == LEASES and not (obj.get("metadata") or {}).get("resourceVersion"):
                # Leases allow unconditional updates (as the real server does): answered, and
                # recorded, because one can overwrite another node's renewal or takeover.
                api.slot_audit.violation(
                    f"update of lease {route.namespace}/{route.name} without "
                    "metadata.resourceVersion (unconditional)"
                )
            self._answer(200, api.store.replace(route.kind, route.namespace, route.name, obj))
        elif verb == "patch":
            if route.kind == LEASES:
                content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
                api.slot_audit.violation(
                    f"patch of lease {route.namespace}/{route.name} ({content_type}): Leases "
                    "change only by updates carrying the resourceVersion read"
                )
            self._answer(200, self._patch(route, body))
        elif verb == "delete":
            assert route.namespace is not None and route.name is not None
            self._answer(200, api.store.delete(route.kind, route.namespace, route.name))
        else:
            raise ApiError(405, f"{self.command} is not supported on {self.path}")

    def _patch(self, route: _Route, body: bytes) -> JsonObject:
        assert route.namespace is not None and route.name is not None
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        patch = json.loads(body or b"{}")
        change: Callable[[JsonObject], JsonObject]
        if content_type == "application/json-patch+json":
            change = functools.partial(json_patch, operations=patch)
        elif content_type in _MERGE_PATCH_TYPES:
            change = functools.partial(merge_patch, patch=patch)
        else:
            raise ApiError(415, f"the body of the request was in an unknown format: {content_type}")
        return self.server.api.store.update(route.kind, route.namespace, route.name, change)

    def _answer(self, code: int, payload: JsonObject) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer_error(self, error: ApiError, *, verb: str) -> None:
        if verb == "watch" and error.code == 410:
            # The real API server reports an expired resourceVersion inside the stream.
            _WatchStream.send_error_event(self, error)
        else:
            self._answer(error.code, error.status())


def _json(body: bytes) -> JsonObject:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"invalid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ApiError(400, "expected a JSON object")
    return value


def _verb(method: str, route: _Route | None, query: Mapping[str, str]) -> str:
    if route is None:
        return "unknown"
    if method == "GET" and route.name is None:
        return "watch" if query.get("watch") in ("1", "true", "True") else "list"
    named = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    if route.name is not None and method in named:
        return named[method]
    if method == "POST" and route.name is None and route.namespace is not None:
        return "create"
    if method == "POST" and route.subresource is not None:
        return "create"
    return "unknown"


class _WatchStream:
    """One watch response: chunked newline-delimited JSON events until timeout or abort."""

    def __init__(
        self, handler: _Handler, api: KubeApiServer, route: _Route, query: Mapping[str, str]
    ) -> None:
        self.handler = handler
        self.api = api
        self.route = route
        self.matches = parse_field_selector(query.get("fieldSelector", ""))
        self.bookmarks = query.get("allowWatchBookmarks") in ("1", "true", "True")
        timeout = float(query.get("timeoutSeconds") or api.default_watch_timeout)
        self.deadline = time.monotonic() + timeout
        self.start_revision = query.get("resourceVersion", "")
        self.connection = handler._connection

    @staticmethod
    def send_error_event(handler: _Handler, error: ApiError) -> None:
        _WatchStream._send_headers(handler)
        _WatchStream._send_chunk(handler, {"type": "ERROR", "object": error.status()})
        handler.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _send_headers(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

    @staticmethod
    def _send_chunk(handler: _Handler, event: JsonObject) -> None:
        line = json.dumps(event).encode() + b"\n"
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))

    def serve(self) -> None:
        cursor = self._starting_cursor()
        self._send_headers(self.handler)
        self.connection.watching = True
        try:
            if self._stream_from(cursor):
                self.handler.wfile.write(b"0\r\n\r\n")  # clean end: timeoutSeconds reached
            else:
                self.handler.close_connection = True
        finally:
            self.connection.watching = False

    def _starting_cursor(self) -> int:
        """The revision to stream after; "" or "0" means: first the current state as ADDED."""
        if self.start_revision in ("", "0"):
            return -1
        try:
            revision = int(self.start_revision)
        except ValueError as error:
            raise ApiError(400, f"invalid resourceVersion {self.start_revision!r}") from error
        self.api.store.require_history(revision)
        return revision

    def _stream_from(self, cursor: int) -> bool:
        """Send changes until the deadline (True) or until the connection is gone (False)."""
        if cursor < 0:
            cursor = self._send_current_state()
        next_bookmark = time.monotonic() + self.api.bookmark_interval
        while time.monotonic() < self.deadline or self.connection.stalled:
            if not self._wait_for_changes(cursor, next_bookmark):
                return False
            if self.connection.stalled:
                continue
            try:
                changes, cursor = self.api.store.changes_since(
                    self.route.kind, self.route.namespace, cursor
                )
            except ApiError as error:  # compacted under a slow watcher: like etcd, say 410
                self._send_chunk(self.handler, {"type": "ERROR", "object": error.status()})
                return True
            for change in [c for c in changes if self.matches(c.object)]:
                self._send_chunk(self.handler, {"type": change.type, "object": change.object})
            if self.bookmarks and time.monotonic() >= next_bookmark:
                # Everything up to `cursor` has been sent, so that is what a bookmark may claim.
                self._send_bookmark(cursor)
                next_bookmark = time.monotonic() + self.api.bookmark_interval
        return True

    def _send_current_state(self) -> int:
        items, revision = self.api.store.items(self.route.kind, self.route.namespace)
        for item in filter(self.matches, items):
            self._send_chunk(self.handler, {"type": "ADDED", "object": item})
        return revision

    def _send_bookmark(self, revision: int) -> None:
        bookmark = {
            "kind": self.route.kind.kind,
            "apiVersion": self.route.kind.api_version,
            "metadata": {"resourceVersion": str(revision)},
        }
        self._send_chunk(self.handler, {"type": "BOOKMARK", "object": bookmark})

    def _wait_for_changes(self, cursor: int, next_bookmark: float) -> bool:
        """Block until something may need sending; False when the stream must end abruptly."""
        store = self.api.store
        with store.changed:
            wake_at = min(self.deadline, next_bookmark, time.monotonic() + _WATCH_POLL_SECONDS)
            if store.revision <= cursor or self.connection.stalled:
                store.changed.wait(max(0.0, wake_at - time.monotonic()))
        return not (self.connection.dropped or self.api.closing or _peer_gone(self.connection))


def _peer_gone(connection: _Connection) -> bool:
    """True when the client closed its end (a watch client never sends anything)."""
    try:
        readable, _, _ = select.select([connection.sock], [], [], 0)
        return bool(readable) and connection.sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# --- the server ---------------------------------------------------------------------------


class KubeApiServer:
    """The test API server. Use as a context manager, or `start()` / `close()`."""

    def __init__(
        self,
        *,
        kubeconfig_path: Path | None = None,
        bookmark_interval: float = 0.2,
        default_watch_timeout: float = 60.0,
        history_limit: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        max_holders: int | None = None,
    ) -> None:
        self.slot_audit = RestartSlotAudit(clock=clock, max_holders=max_holders)
        self.store = ObjectStore(
            history_limit=history_limit,
            validate=validate_lease,
            on_change=self.slot_audit.observe,
        )
        self.kubeconfig_path = kubeconfig_path
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.kinds: dict[tuple[str, str, str], Kind] = {}
        self.unexpected_errors: list[str] = []
        self.refused_connections = 0
        self.closing = False
        self.outage_active = False
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._log: list[RecordedRequest] = []
        self._connections: dict[socket.socket, _Connection] = {}
        self._handler_threads: set[threading.Thread] = set()
        self._http: _HttpServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._eviction_refusals: dict[tuple[str, str], int] = {}
        self._evictions: list[tuple[str, str]] = []
        for kind in (SECRETS, EVENTS, LEASES, PODS):
            self.register_kind(kind)

    # lifecycle

    def start(self) -> KubeApiServer:
        self._http = _HttpServer(("127.0.0.1", 0), _Handler)
        self._http.api = self
        self._serve_thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="kubeapi-serve",
            daemon=True,
        )
        self._serve_thread.start()
        if self.kubeconfig_path is not None:
            self.write_kubeconfig(self.kubeconfig_path)
        return self

    def close(self) -> None:
        """Stop serving: end every watch and keep-alive connection, join every thread."""
        self.closing = True
        with self.store.changed:
            self.store.changed.notify_all()
        self._abort_connections(lambda _: True)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join(timeout=5)
        for thread in list(self._handler_threads):
            thread.join(timeout=5)
            if thread.is_alive():
                self.unexpected_errors.append(f"handler thread {thread.name} did not end")

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        assert self._http is not None, "server not started"
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """A kubeconfig for this server (JSON is valid YAML, which the client reads)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "node-agent", "user": {"token": TOKEN}}],
            "contexts": [
                {
                    "name": "test",
                    "context": {"cluster": "test", "user": "node-agent", "namespace": namespace},
                }
            ],
            "current-context": "test",
        }
        path.write_text(json.dumps(config, indent=2))
        self.kubeconfig_path = path
        return path

    def register_kind(self, kind: Kind) -> None:
        self.kinds[(kind.group, kind.version, kind.plural)] = kind

    # objects, for tests

    def create_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, bytes],
        *,
        type: str = "Opaque",  # the Secret field's name
    ) -> str:
        """Create a Secret; returns its resourceVersion."""
        obj = {"metadata": {"name": name}, "type": type, "data": _encode(data)}
        created = self.store.create(SECRETS, namespace, obj)
        return str(created["metadata"]["resourceVersion"])

    def update_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, bytes],
        *,
        type: str | None = None,
    ) -> str:
        """Replace a Secret's data (and type, if given); returns the new resourceVersion."""

        def change(obj: JsonObject) -> JsonObject:
            obj["data"] = _encode(data)
            if type is not None:
                obj["type"] = type
            return obj

        return str(
            self.store.update(SECRETS, namespace, name, change)["metadata"]["resourceVersion"]
        )

    def touch_secret(self, namespace: str, name: str) -> str:
        """Change only metadata (an annotation): a new resourceVersion, the same data."""

        def change(obj: JsonObject) -> JsonObject:
            annotations = obj["metadata"].setdefault("annotations", {})
            annotations["touched"] = str(int(annotations.get("touched", "0")) + 1)
            return obj

        return str(
            self.store.update(SECRETS, namespace, name, change)["metadata"]["resourceVersion"]
        )

    def delete_secret(self, namespace: str, name: str) -> str:
        """Delete a Secret; returns the resourceVersion of the deletion."""
        return str(self.store.delete(SECRETS, namespace, name)["metadata"]["resourceVersion"])

    def events(
        self, namespace: str | None = None, *, reason: str | None = None
    ) -> list[JsonObject]:
        """core/v1 Events created through the API, oldest first."""
        items, _ = self.store.items(EVENTS, namespace)
        items.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [e for e in items if reason in (None, e.get("reason"))]

    def leases(self, namespace: str) -> list[JsonObject]:
        """The Leases of `namespace`, by name."""
        items, _ = self.store.items(LEASES, namespace)
        return items

    def lease(self, namespace: str, name: str) -> JsonObject | None:
        """One Lease, or None when there is none of that name."""
        try:
            return self.store.get(LEASES, namespace, name)
        except ApiError:
            return None

    def release_lease(self, namespace: str, name: str) -> str:
        """What an operator does to free a stuck slot: clear `spec.holderIdentity` (an update
        at the current resourceVersion). Returns the new resourceVersion."""

        def change(obj: JsonObject) -> JsonObject:
            obj.setdefault("spec", {}).pop("holderIdentity", None)
            return obj

        return str(
            self.store.update(LEASES, namespace, name, change)["metadata"]["resourceVersion"]
        )

    def delete_lease(self, namespace: str, name: str) -> str:
        """Delete a Lease; returns the resourceVersion of the deletion."""
        return str(self.store.delete(LEASES, namespace, name)["metadata"]["resourceVersion"])

    def create_pod(
        self,
        namespace: str,
        name: str,
        *,
        node: str,
        image: str,
        waiting: str | None = "ImagePullBackOff",
        init_image: str | None = None,
        init_waiting: str | None = None,
        controller: str | None = "ReplicaSet/app",
    ) -> str:
        """A pod bound to `node` whose container (and init container, if given) waits for
        `waiting` (None: running), owned by `controller` (`Kind/name`; None: no owner).
        Returns its uid."""
        metadata: JsonObject = {"name": name}
        if controller is not None:
            kind, _, owner = controller.partition("/")
            owner_uid = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{namespace}/{controller}"))
            metadata["ownerReferences"] = [
                {
                    "apiVersion": "apps/v1",
                    "kind": kind,
                    "name": owner,
                    "uid": owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        spec: JsonObject = {"nodeName": node, "containers": [{"name": "app", "image": image}]}
        status: JsonObject = {
            "phase": "Pending",
            "containerStatuses": [_container_status("app", image, waiting)],
        }
        if init_image is not None:
            spec["initContainers"] = [{"name": "init", "image": init_image}]
            status["initContainerStatuses"] = [_container_status("init", init_image, init_waiting)]
        created = self.store.create(
            PODS, namespace, {"metadata": metadata, "spec": spec, "status": status}
        )
        return str(created["metadata"]["uid"])

    def pods(self, namespace: str | None = None) -> list[JsonObject]:
        items, _ = self.store.items(PODS, namespace)
        return items

    def forbid_eviction(self, namespace: str, name: str, *, times: int) -> None:
        """Answer the next `times` evictions of this pod 429, as a PodDisruptionBudget that
        allows no disruption does."""
        with self._lock:
            self._eviction_refusals[(namespace, name)] = times

    def evictions(self) -> list[tuple[str, str]]:
        """(namespace, name) of every pod evicted, in order."""
        with self._lock:
            return list(self._evictions)

    # the restart-slot audit, for tests (see RestartSlotAudit)

    def violations(self) -> list[str]:
        """What the agent did wrong with Leases, oldest first (the kube_api fixture fails a test
        that leaves any)."""
        return self.slot_audit.violations()

    def clear_violations(self) -> None:
        self.slot_audit.clear_violations()

    def slot_timeline(self, namespace: str | None = None) -> list[SlotChange]:
        """Every change of a restart slot, oldest first."""
        return self.slot_audit.timeline(namespace)

    # faults, for tests

    def fail_next(
        self,
        code: int,
        *,
        times: int | None = 1,
        verb: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next `times` requests (of `verb`, if given) with `code`; None: until
        `clear_faults()`. A watch failing with 410 gets it as an ERROR event, like the real one.
        `message`: the Status message instead of one like the real server's."""
        with self._lock:
            self._faults.append(_Fault(code, times, verb, message))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def drop_watches(self) -> int:
        """Abruptly close every open watch connection (no terminating chunk). Returns how many."""
        return self._abort_connections(lambda c: c.watching)

    def stall_watches(self) -> int:
        """Open watch streams stay connected but send nothing more. Returns how many."""
        with self._lock:
            stalled = [c for c in self._connections.values() if c.watching]
            for connection in stalled:
                connection.stalled = True
        return len(stalled)

    def open_watches(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections.values() if c.watching and not c.dropped)

    def set_outage(self, active: bool) -> None:
        """While active, every connection is closed at once, unanswered (such requests are not
        in the request log; `refused_connections` counts them)."""
        self.outage_active = active
        if active:
            self._abort_connections(lambda _: True)

    @contextmanager
    def outage(self) -> Iterator[None]:
        self.set_outage(True)
        try:
            yield
        finally:
            self.set_outage(False)

    def compact(self) -> str:
        """Forget the change history: watches from older resourceVersions get 410 Gone."""
        return str(self.store.compact())

    # request log, for tests

    def requests(
        self, *, verb: str | None = None, plural: str | None = None
    ) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._log if verb in (None, r.verb) and plural in (None, r.plural)]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # internals used by the handler

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._log.append(request)

    def _inject_fault(self, verb: str, kind: Kind) -> None:
        with self._lock:
            fault = next((f for f in self._faults if f.verb in (None, verb)), None)
            if fault is None:
                return
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
        raise ApiError(fault.code, fault.message or _fault_message(fault.code, verb, kind))

    def _evict(self, namespace: str, name: str) -> JsonObject:
        """The eviction subresource: 429 while refusals are left, else the pod is deleted
        (the real API server deletes it gracefully; here at once)."""
        self.store.get(PODS, namespace, name)  # 404 when there is no such pod
        with self._lock:
            refusals = self._eviction_refusals.get((namespace, name), 0)
            if refusals:
                self._eviction_refusals[(namespace, name)] = refusals - 1
        if refusals:
            raise ApiError(
                429,
                "Cannot evict pod as it would violate the pod's disruption budget.",
                reason="TooManyRequests",
            )
        self.store.delete(PODS, namespace, name)
        with self._lock:
            self._evictions.append((namespace, name))
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }

    def _find_route(self, path: str) -> _Route | None:
        """`/api/v1[/namespaces/NS]/PLURAL[/NAME]` or `/apis/GROUP/VERSION/...`; None: unknown."""
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        kind = self.kinds.get((group, version, rest[0] if rest else ""))
        if kind is None or len(rest) > 3:
            return None
        if len(rest) == 3:
            if namespace is None or rest[2] not in _SUBRESOURCES.get(kind.plural, ()):
                return None
            return _Route(kind, namespace, rest[1], rest[2])
        return _Route(kind, namespace, rest[1] if len(rest) == 2 else None)

    def _list(self, route: _Route, query: Mapping[str, str]) -> JsonObject:
        matches = parse_field_selector(query.get("fieldSelector", ""))
        items, revision = self.store.items(route.kind, route.namespace)
        items = [i for i in items if matches(i)]
        start = _continue_position(query.get("continue"), self.store)
        items = [i for i in items if _list_key(i) > start]
        limit = int(query.get("limit") or 0)
        metadata: JsonObject = {"resourceVersion": str(revision)}
        if limit and len(items) > limit:
            items = items[:limit]
            metadata["continue"] = _continue_token(revision, _list_key(items[-1]))
        return {
            "kind": f"{route.kind.kind}List",
            "apiVersion": route.kind.api_version,
            "metadata": metadata,
            "items": items,
        }

    def _register(self, sock: socket.socket) -> _Connection:
        connection = _Connection(sock)
        with self._lock:
            self._connections[sock] = connection
            self._handler_threads.add(threading.current_thread())
        return connection

    def _unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.pop(sock, None)
            self._handler_threads.discard(threading.current_thread())

    def _abort_connections(self, which: Callable[[_Connection], bool]) -> int:
        with self._lock:
            doomed = [c for c in self._connections.values() if which(c) and not c.dropped]
            for connection in doomed:
                connection.dropped = True
                # shutdown, not close: the handler thread still owns the descriptor.
                with suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)
        with self.store.changed:
            self.store.changed.notify_all()
        return len(doomed)


def _container_status(name: str, image: str, waiting: str | None) -> JsonObject:
    state: JsonObject = (
        {"waiting": {"reason": waiting, "message": f"{waiting}: pulling {image}"}}
        if waiting
        else {"running": {"startedAt": _now()}}
    )
    return {"name": name, "image": image, "ready": False, "restartCount": 0, "state": state}


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {key: base64.b64encode(value).decode() for key, value in data.items()}


def _list_key(obj: JsonObject) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def _continue_token(revision: int, last_key: str) -> str:
    raw = json.dumps({"rv": revision, "start": last_key}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _continue_position(token: str | None, store: ObjectStore) -> str:
    """Where a continued list resumes; 410 when the token's revision has been compacted."""
    if not token:
        return ""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token))
        revision, start = int(decoded["rv"]), str(decoded["start"])
    except (ValueError, KeyError, TypeError) as error:
        raise ApiError(400, "invalid continue token") from error
    try:
        store.require_history(revision)
    except ApiError as error:
        raise ApiError(
            410,
            "The provided continue parameter is too old to display a consistent list result. "
            "You can start a new list without the continue parameter.",
        ) from error
    return start


def _fault_message(code: int, verb: str, kind: Kind) -> str:
    if code == 403:
        return (
            f'{kind.plural} is forbidden: User "{USER}" cannot {verb} resource "{kind.plural}" '
            f'in API group "{kind.group}"'
        )
    if code == 410:
        return "too old resource version (injected)"
    return f"injected fault {code} for {verb}"
