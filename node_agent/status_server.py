"""Metrics and health over HTTP on one port: `/metrics`, `/healthz`, `/readyz`.

`Health` is the state the daemon's loops update; `StatusServer` answers from it and from the
metrics registry.

The port is reachable from the pod network, so the server is bounded whatever a client does:
one thread serves every connection from a `selectors` loop (no thread per connection to run
out of), at most `ServerLimits.connections` are open at once (a new one pushes out the
oldest, so a probe is never locked out by clients that connect and say nothing), a request's
headers may take at most `header_bytes` (431 beyond), and a connection gets one deadline for
everything, from accept to the last byte of the answer. Answers are HTTP/1.0 and the
connection closes after each. `/metrics` is rendered only for a client still connected.
An idle server costs no CPU; `stop()` returns at once (a wake-up socket ends the loop).
"""

import contextlib
import errno
import gzip
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from node_agent.escaping import bounded
from node_agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

_REASON_LIMIT = 300  # a probe answer is one line, read by humans in `kubectl describe pod`
_TEXT = "text/plain; charset=utf-8"
_SERVER: Final = "node-agent"
_READ_CHUNK = 4096
_ACCEPTS_PER_ROUND = 64
_LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class ServerLimits:
    """What one client may cost the status server."""

    connections: int = 64
    """Open connections at most; a new one closes the oldest."""
    header_bytes: int = 8192
    """Request line and headers together; more is answered 431."""
    request_seconds: float = 5.0
    """From accept to the last byte of the answer, for the whole request."""
    linger_seconds: float = 1.0
    """After answering a client that is still sending, how long its rest is read and
    dropped before the close (closing with unread data would reset the answer away)."""


class Health:
    """Thread-safe liveness and readiness, updated by the daemon's loops.

    Alive: every registered loop beat within `stale_after` seconds (a loop counts as having
    beaten when it registers). Ready: as last set; not ready until the first `set_ready`.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, stale_after: float = 60.0
    ) -> None:
        self._clock = clock
        self._stale_after = stale_after
        self._lock = threading.Lock()
        self._beats: dict[str, float] = {}
        self._registered: set[str] = set()
        self._ready = False
        self._reason = "waiting for the first successful reconcile"

    def register_loop(self, loop: str) -> None:
        """From now on, `loop` must beat at least every `stale_after` seconds."""
        with self._lock:
            self._registered.add(loop)
            self._beats[loop] = self._clock()

    def unregister_loop(self, loop: str) -> None:
        """`loop` ended on purpose (a source removed, shutdown): stop expecting beats."""
        with self._lock:
            self._registered.discard(loop)
            self._beats.pop(loop, None)

    def beat(self, loop: str) -> None:
        with self._lock:
            self._beats[loop] = self._clock()

    def set_ready(self, ready: bool, reason: str) -> None:
        """`reason` is shown on /readyz: name sources and files, never credentials."""
        with self._lock:
            self._ready, self._reason = ready, _one_line(reason)

    def liveness(self) -> tuple[bool, str]:
        with self._lock:
            now = self._clock()
            silent = {
                loop: now - self._beats[loop]
                for loop in sorted(self._registered)
                if now - self._beats[loop] > self._stale_after
            }
        if not silent:
            return True, "ok"
        return False, "; ".join(
            f"loop {loop} silent for {age:.0f}s (limit {self._stale_after:g}s)"
            for loop, age in silent.items()
        )

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            return self._ready, self._reason


def _one_line(text: str) -> str:
    return bounded(" ".join(text.split()), _REASON_LIMIT)


@dataclass(frozen=True)
class BindAddress:
    """Where to listen. `host` "" means every interface, IPv6 and IPv4 where possible."""

    host: str
    port: int

    @classmethod
    def parse(cls, address: str) -> "BindAddress":
        """`:9464`, `127.0.0.1:0`, `[::]:9464`, `localhost:9464`; ValueError otherwise."""
        host, colon, port = address.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            colon = ""  # an unbracketed IPv6 address: which colon starts the port?
        if not colon or not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"listen address {address!r}: expected HOST:PORT, :PORT or [IPV6]:PORT"
            )
        return cls(host, int(port))


@dataclass(frozen=True)
class _Answer:
    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def _text(status: int, text: str) -> _Answer:
    return _Answer(status, _TEXT, f"{text}\n".encode())


def _probe(ok: bool, reason: str) -> _Answer:
    return _text(200, "ok") if ok else _text(503, reason)


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: Mapping[str, str]


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


def _parse_request(head: bytes) -> _Request:
    """The request line and headers of `head` (everything before the blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise _BadRequest(HTTPStatus.BAD_REQUEST) from None
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/"):
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(HTTPStatus.BAD_REQUEST)
        headers[name.lower()] = value.strip()
    return _Request(method, target, headers)


def _encoded(answer: _Answer, *, with_body: bool) -> bytes:
    reason = HTTPStatus(answer.status).phrase
    lines = [
        f"HTTP/1.0 {answer.status} {reason}",
        f"Server: {_SERVER}",
        f"Date: {formatdate(usegmt=True)}",
        f"Content-Type: {answer.content_type}",
        f"Content-Length: {len(answer.body)}",
        *(f"{name}: {value}" for name, value in answer.headers.items()),
        "Connection: close",
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + answer.body if with_body else head


class _Responder:
    """What to answer to a request: routes and renders, no sockets."""

    def __init__(self, *, metrics: AgentMetrics, health: Health) -> None:
        self._metrics = metrics
        self._health = health

    def answer(self, request: _Request) -> _Answer:
        if request.method not in ("GET", "HEAD"):
            return _text(HTTPStatus.NOT_IMPLEMENTED, "only GET and HEAD")
        url = urlsplit(request.target)
        try:
            if url.path == "/metrics":
                return self._metrics_answer(parse_qs(url.query), request.headers)
            if url.path == "/healthz":
                return _probe(*self._health.liveness())
            if url.path == "/readyz":
                return _probe(*self._health.readiness())
        except Exception:
            log.exception("status server: answering %s failed", url.path)
            return _text(500, "internal error, see the agent's log")
        return _text(404, "not found: try /metrics, /healthz or /readyz")

    def _metrics_answer(
        self, query: Mapping[str, list[str]], headers: Mapping[str, str]
    ) -> _Answer:
        """The registry in the format the scraper asks for (Accept: text or OpenMetrics),
        gzipped if it accepts that, optionally only the families in `name[]`."""
        collector: Collector = self._metrics.registry
        if "name[]" in query:
            collector = self._metrics.registry.restricted_registry(query["name[]"])
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(collector)
        if gzip_accepted(headers.get("accept-encoding", "")):
            return _Answer(200, content_type, gzip.compress(body), {"Content-Encoding": "gzip"})
        return _Answer(200, content_type, body)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    outgoing: memoryview | None = None
    """The answer not yet sent; None while the request is still being read."""
    lingering_until: float | None = None


class _Loop:
    """The one thread's work: accept, read, answer, write, expire."""

    def __init__(
        self,
        listener: socket.socket,
        wake: socket.socket,
        responder: _Responder,
        limits: ServerLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listener = listener
        self._wake = wake
        self._responder = responder
        self._limits = limits
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._open: dict[socket.socket, _Connection] = {}  # oldest first

    def run(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake, selectors.EVENT_READ, "wake")
        try:
            while self._round():
                pass
        finally:
            for connection in list(self._open.values()):
                self._close(connection)
            self._selector.close()

    def _round(self) -> bool:
        for key, mask in self._selector.select(self._timeout()):
            if key.data == "wake":
                return False
            if key.data == "accept":
                self._accept()
            elif isinstance(key.data, _Connection):
                self._serve(key.data, mask)
        self._expire()
        return True

    def _timeout(self) -> float | None:
        deadlines = [self._deadline_of(c) for c in self._open.values()]
        return max(0.0, min(deadlines) - self._clock()) if deadlines else None

    @staticmethod
    def _deadline_of(connection: _Connection) -> float:
        return connection.lingering_until or connection.deadline

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_ROUND):
            try:
                sock, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE and friends: try again next round
                log.debug("status server: accept failed: %s", error)
                return
            if len(self._open) >= self._limits.connections:
                self._close(next(iter(self._open.values())))
            sock.setblocking(False)
            connection = _Connection(sock, self._clock() + self._limits.request_seconds)
            self._open[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _serve(self, connection: _Connection, mask: int) -> None:
        try:
            if connection.lingering_until is not None:
                self._drain(connection)
            elif connection.outgoing is None and mask & selectors.EVENT_READ:
                self._read(connection)
            elif connection.outgoing is not None and mask & selectors.EVENT_WRITE:
                self._write(connection)
        except OSError:
            self._close(connection)  # reset by the client, and the like: nothing to say

    def _read(self, connection: _Connection) -> None:
        chunk = connection.sock.recv(_READ_CHUNK)
        if not chunk:
            self._close(connection)  # gone before the request was complete
            return
        connection.received += chunk
        end = connection.received.find(b"\r\n\r\n")
        if end == -1:
            if len(connection.received) > self._limits.header_bytes:
                self._respond(connection, _text(431, "request headers too large"), True)
            return
        if end > self._limits.header_bytes:
            self._respond(connection, _text(431, "request headers too large"), True)
            return
        try:
            request = _parse_request(bytes(connection.received[:end]))
        except _BadRequest as bad:
            self._respond(connection, _text(bad.status, bad.status.phrase), True)
            return
        if request.target.startswith("/metrics") and _peer_closed(connection.sock):
            self._close(connection)  # never render /metrics for a client that left
            return
        answer = self._responder.answer(request)
        self._respond(connection, answer, request.method != "HEAD")

    def _respond(self, connection: _Connection, answer: _Answer, with_body: bool) -> None:
        connection.received = bytearray()
        connection.outgoing = memoryview(_encoded(answer, with_body=with_body))
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        assert connection.outgoing is not None
        try:
            sent = connection.sock.send(connection.outgoing)
        except BlockingIOError:
            return
        connection.outgoing = connection.outgoing[sent:]
        if not connection.outgoing:
            self._finish(connection)

    def _finish(self, connection: _Connection) -> None:
        """Answered: half-close, then read and drop what the client still sends, briefly."""
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        connection.lingering_until = min(
            connection.deadline, self._clock() + self._limits.linger_seconds
        )
        self._selector.modify(connection.sock, selectors.EVENT_READ, connection)

    def _drain(self, connection: _Connection) -> None:
        if not connection.sock.recv(_READ_CHUNK):
            self._close(connection)

    def _expire(self) -> None:
        now = self._clock()
        for connection in [c for c in self._open.values() if self._deadline_of(c) <= now]:
            self._close(connection)

    def _close(self, connection: _Connection) -> None:
        self._open.pop(connection.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        connection.sock.close()


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the client has closed its side (or reset): a peek reads EOF or an error."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError as error:
        return error.errno != errno.EAGAIN


def _listening_socket(bind: BindAddress) -> socket.socket:
    dual_stack = not bind.host and socket.has_dualstack_ipv6()
    host = bind.host or ("::" if dual_stack else "0.0.0.0")  # noqa: S104 - on purpose
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, bind.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(sockaddr)
        listener.listen(_LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


class StatusServer:
    """`/metrics`, `/healthz` and `/readyz` on `address` (`:9464`, `127.0.0.1:0`, `[::]:9464`).

    `start()` binds (OSError if it cannot, e.g. the port is taken) and serves from a daemon
    thread; `port` is the bound port; `stop()` closes the socket at once.
    """

    def __init__(
        self,
        address: str,
        *,
        metrics: AgentMetrics,
        health: Health,
        limits: ServerLimits | None = None,
    ) -> None:
        self._bind = BindAddress.parse(address)
        self._responder = _Responder(metrics=metrics, health=health)
        self._limits = limits or ServerLimits()
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the status server is not started")
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("the status server is already started")
        listener = _listening_socket(self._bind)
        self._listener, self._wake = listener, socket.socketpair()
        loop = _Loop(listener, self._wake[0], self._responder, self._limits)
        self._thread = threading.Thread(target=loop.run, name="status-server", daemon=True)
        self._thread.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)

    def stop(self) -> None:
        if self._listener is None or self._wake is None or self._thread is None:
            return
        self._wake[1].send(b"\0")
        self._thread.join(timeout=5)
        self._listener.close()
        for end in self._wake:
            end.close()
        self._listener = self._wake = self._thread = None
