"""Metrics and health over HTTP on one port: `/metrics`, `/healthz`, `/readyz`.

`Health` is the state the daemon's loops update; `StatusServer` answers from it and from the
metrics registry. The server is the stdlib `ThreadingHTTPServer`: one short-lived daemon
thread per request, HTTP/1.0 (each connection closes after its answer), no request log.
Its accept loop waits on the listening socket and a wake-up socket together, so an idle
server costs no CPU and `stop()` returns at once (`serve_forever` polls twice a second and
needs up to that long to stop).
"""

import gzip
import logging
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from node_agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

_REASON_LIMIT = 300  # a probe answer is one line, read by humans in `kubectl describe pod`
_TEXT = "text/plain; charset=utf-8"


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
    return " ".join(text.split())[:_REASON_LIMIT]


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never holds up stop() or the process's exit
    timeout = 0.0  # handle_request() is called only when a connection is already waiting

    def __init__(self, bind: BindAddress, *, metrics: AgentMetrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        self.dual_stack = not bind.host and socket.has_dualstack_ipv6()
        host = bind.host or ("::" if self.dual_stack else "0.0.0.0")  # noqa: S104 - on purpose
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, bind.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.address_family = family
        super().__init__((str(sockaddr[0]), int(sockaddr[1])), _Handler)

    def server_bind(self) -> None:
        # Skips HTTPServer.server_bind, whose reverse DNS lookup (getfqdn) can hang for
        # seconds in a pod; the server name is not used.
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up, send garbage, time out: none of it concerns the operator.
        log.debug("status server: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds: a client that connects and says nothing is dropped
    server_version = "node-agent"
    # Errors of unparseable requests (TLS by mistake, garbage) as plain HTTP/1.0 answers,
    # instead of the stdlib's header-less HTTP/0.9 HTML page.
    default_request_version = "HTTP/1.0"
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = _TEXT

    def version_string(self) -> str:
        return self.server_version  # no Python version on the wire

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: scrapes and probes every few seconds would drown the agent's own log."""

    def do_GET(self) -> None:
        self._send(self._answer(), with_body=True)

    def do_HEAD(self) -> None:
        self._send(self._answer(), with_body=False)

    def _answer(self) -> _Answer:
        url = urlsplit(self.path)
        try:
            if url.path == "/metrics":
                return self._metrics(parse_qs(url.query))
            if url.path == "/healthz":
                return _probe(*self.server.health.liveness())
            if url.path == "/readyz":
                return _probe(*self.server.health.readiness())
        except Exception:
            log.exception("status server: answering %s failed", url.path)
            return _text(500, "internal error, see the agent's log")
        return _text(404, "not found: try /metrics, /healthz or /readyz")

    def _metrics(self, query: Mapping[str, list[str]]) -> _Answer:
        """The registry in the format the scraper asks for (Accept: text or OpenMetrics),
        gzipped if it accepts that, optionally only the families in `name[]`."""
        collector: Collector = self.server.metrics.registry
        if "name[]" in query:
            collector = self.server.metrics.registry.restricted_registry(query["name[]"])
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(collector)
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            return _Answer(200, content_type, gzip.compress(body), {"Content-Encoding": "gzip"})
        return _Answer(200, content_type, body)

    def _send(self, answer: _Answer, *, with_body: bool) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(answer.body)


class StatusServer:
    """`/metrics`, `/healthz` and `/readyz` on `address` (`:9464`, `127.0.0.1:0`, `[::]:9464`).

    `start()` binds (OSError if it cannot, e.g. the port is taken) and serves from a daemon
    thread; `port` is the bound port; `stop()` closes the socket at once.
    """

    def __init__(self, address: str, *, metrics: AgentMetrics, health: Health) -> None:
        self._bind = BindAddress.parse(address)
        self._metrics = metrics
        self._health = health
        self._server: _Server | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the status server is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the status server is already started")
        server = _Server(self._bind, metrics=self._metrics, health=self._health)
        self._server, self._wake = server, socket.socketpair()
        self._thread = threading.Thread(
            target=_serve, args=(server, self._wake[0]), name="status-server", daemon=True
        )
        self._thread.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)

    def stop(self) -> None:
        if self._server is None or self._wake is None or self._thread is None:
            return
        self._wake[1].send(b"\0")
        self._thread.join(timeout=5)
        self._server.server_close()
        for end in self._wake:
            end.close()
        self._server = self._wake = self._thread = None


def _serve(server: _Server, wake: socket.socket) -> None:
    """Accept connections until `wake` becomes readable."""
    with selectors.DefaultSelector() as selector:
        selector.register(server, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        while True:
            ready = selector.select()
            if any(key.fileobj is wake for key, _ in ready):
                return
            server.handle_request()
