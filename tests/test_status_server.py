"""The status server answers real HTTP on 127.0.0.1: /metrics, /healthz, /readyz.

Each test binds port 0 and asks with `urllib.request`; health staleness uses a fake clock.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from email.message import Message

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node_agent.metrics import AgentMetrics
from node_agent.status_server import BindAddress, Health, ServerLimits, StatusServer

ISSUE_METRICS = {
    "node_agent_reconcile_total",
    "node_agent_reconcile_duration_seconds_bucket",
    "node_agent_drift_repairs_total",
    "node_agent_in_sync",
    "node_agent_managed_registries",
    "node_agent_last_success_timestamp_seconds",
    "node_agent_containerd_restarts_total",
    "node_agent_source_errors_total",
    "node_agent_watch_restarts_total",
}


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class Served:
    server: StatusServer
    metrics: AgentMetrics
    health: Health
    clock: FakeClock = field(default_factory=FakeClock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def get(
        self, path: str, *, headers: Mapping[str, str] | None = None, method: str = "GET"
    ) -> Answer:
        request = urllib.request.Request(
            self.base_url + path, headers=dict(headers or {}), method=method
        )
        # No proxy from the environment: the request must reach 127.0.0.1 itself.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=5) as response:
                return Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            with error:
                return Answer(error.code, error.headers, error.read())


@pytest.fixture
def served() -> Iterator[Served]:
    clock = FakeClock()
    metrics = AgentMetrics(CollectorRegistry())
    metrics.add_targets(["containerd", "kubelet"])
    metrics.add_sources(["kube-system/registry-credentials"])
    health = Health(clock=clock, stale_after=60.0)
    server = StatusServer("127.0.0.1:0", metrics=metrics, health=health)
    server.start()
    yield Served(server, metrics, health, clock)
    server.stop()


def metric_names(exposition: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


# --- /metrics -------------------------------------------------------------------------------


def test_metrics_shows_every_metric_the_issue_names(served: Served) -> None:
    answer = served.get("/metrics")

    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert metric_names(answer.text) >= ISSUE_METRICS
    assert 'node_agent_reconcile_total{result="applied"} 0.0' in answer.text


def test_metrics_follow_the_registry(served: Served) -> None:
    served.metrics.reconcile_total.labels(result="applied").inc(3)
    served.metrics.drift_repairs_total.labels(target="kubelet").inc()

    text = served.get("/metrics").text

    assert 'node_agent_reconcile_total{result="applied"} 3.0' in text
    assert 'node_agent_drift_repairs_total{target="kubelet"} 1.0' in text


def test_metrics_in_openmetrics_when_the_scraper_asks_for_it(served: Served) -> None:
    answer = served.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )

    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
    assert answer.text.endswith("# EOF\n")
    assert "node_agent_reconcile_total" in answer.text


def test_metrics_gzipped_when_the_scraper_accepts_it(served: Served) -> None:
    answer = served.get("/metrics", headers={"Accept-Encoding": "gzip"})

    assert answer.headers["Content-Encoding"] == "gzip"
    assert metric_names(gzip.decompress(answer.body).decode()) >= ISSUE_METRICS


def test_metrics_restricted_to_the_families_asked_for(served: Served) -> None:
    text = served.get("/metrics?name[]=node_agent_in_sync").text

    assert metric_names(text) == {"node_agent_in_sync"}


class BrokenCollector:
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("collector bug")
        yield GaugeMetricFamily("never", "never")  # makes this a generator


def test_a_failing_collector_gives_500_and_the_server_keeps_serving(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.metrics.registry.register(BrokenCollector())

    assert served.get("/metrics").status == 500
    assert served.get("/healthz").status == 200
    assert "answering /metrics failed" in caplog.text


# --- /healthz and /readyz -------------------------------------------------------------------


def test_healthz_is_ok_while_every_registered_loop_beats(served: Served) -> None:
    served.health.register_loop("worker")
    served.clock.now += 59
    served.health.beat("worker")
    served.clock.now += 59

    answer = served.get("/healthz")

    assert (answer.status, answer.text) == (200, "ok\n")
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_healthz_fails_when_a_loop_goes_silent_and_recovers_when_it_beats(
    served: Served,
) -> None:
    served.health.register_loop("worker")
    served.health.register_loop("watch:kube-system/registry-credentials")
    served.clock.now += 30
    served.health.beat("worker")
    served.clock.now += 31

    stale = served.get("/healthz")
    served.health.beat("watch:kube-system/registry-credentials")
    recovered = served.get("/healthz")

    assert stale.status == 503
    assert stale.text == "loop watch:kube-system/registry-credentials silent for 61s (limit 60s)\n"
    assert (recovered.status, recovered.text) == (200, "ok\n")


def test_readyz_waits_for_the_first_reconcile_then_follows_set_ready(served: Served) -> None:
    before = served.get("/readyz")
    served.health.set_ready(True, "reconciled")
    ready = served.get("/readyz")
    served.health.set_ready(False, "source kube-system/registry-credentials is invalid")
    invalid = served.get("/readyz")

    assert (before.status, before.text) == (503, "waiting for the first successful reconcile\n")
    assert (ready.status, ready.text) == (200, "ok\n")
    assert (invalid.status, invalid.text) == (
        503,
        "source kube-system/registry-credentials is invalid\n",
    )


def test_readiness_does_not_depend_on_liveness(served: Served) -> None:
    served.health.register_loop("worker")
    served.health.set_ready(True, "reconciled")
    served.clock.now += 120

    assert served.get("/readyz").status == 200
    assert served.get("/healthz").status == 503


# --- HTTP behaviour -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/metricsx", "/healthz/extra", "/favicon.ico"])
def test_other_paths_are_404(served: Served, path: str) -> None:
    answer = served.get(path)

    assert answer.status == 404
    assert "/metrics" in answer.text


def test_query_strings_do_not_change_the_route(served: Served) -> None:
    assert served.get("/healthz?verbose=1").status == 200


def test_head_answers_headers_without_a_body(served: Served) -> None:
    answer = served.get("/healthz", method="HEAD")

    assert answer.status == 200
    assert answer.body == b""
    assert answer.headers["Content-Length"] == "3"


def test_other_methods_are_refused(served: Served) -> None:
    assert served.get("/metrics", method="POST").status == 501


def raw_request(served: Served, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", served.server.port), timeout=5) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(50),  # a TLS ClientHello
        b"GARBAGE\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n",
        b"",
    ],
)
def test_a_bad_request_is_answered_or_dropped_and_the_server_keeps_serving(
    served: Served, payload: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    reply = raw_request(served, payload)

    assert reply == b"" or reply.startswith(b"HTTP/1.0 4") or reply.startswith(b"HTTP/1.0 5")
    assert served.get("/healthz").status == 200
    assert capfd.readouterr().err == ""


def test_requests_are_not_logged_to_stderr(
    served: Served, capfd: pytest.CaptureFixture[str]
) -> None:
    served.get("/metrics")
    served.get("/nothing-here")

    assert capfd.readouterr().err == ""


def test_a_silent_client_does_not_block_other_requests(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.server.port), timeout=5):
        assert served.get("/healthz").status == 200


def test_stop_closes_the_socket_promptly_even_with_a_client_connected(served: Served) -> None:
    port = served.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        started = time.monotonic()
        served.server.stop()
        elapsed = time.monotonic() - started

    assert elapsed < 0.5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_stop_is_idempotent_and_start_twice_is_refused(served: Served) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        served.server.start()
    served.server.stop()
    served.server.stop()
    with pytest.raises(RuntimeError, match="not started"):
        _ = served.server.port


def test_binding_a_taken_port_raises_oserror(served: Served) -> None:
    second = StatusServer(
        f"127.0.0.1:{served.server.port}", metrics=served.metrics, health=served.health
    )
    with pytest.raises(OSError):
        second.start()


# --- Health without HTTP --------------------------------------------------------------------


def test_a_loop_counts_as_alive_when_it_registers() -> None:
    clock = FakeClock()
    health = Health(clock=clock, stale_after=10)
    clock.now += 100
    health.register_loop("files")

    assert health.liveness() == (True, "ok")


def test_beats_of_unregistered_loops_do_not_matter() -> None:
    clock = FakeClock()
    health = Health(clock=clock, stale_after=10)
    health.beat("worker")
    clock.now += 100

    assert health.liveness() == (True, "ok")


def test_an_unregistered_loop_is_no_longer_expected_to_beat() -> None:
    clock = FakeClock()
    health = Health(clock=clock, stale_after=10)
    health.register_loop("watch:ns/gone")
    health.unregister_loop("watch:ns/gone")
    clock.now += 100

    assert health.liveness() == (True, "ok")


def test_every_silent_loop_is_named() -> None:
    clock = FakeClock()
    health = Health(clock=clock, stale_after=10)
    health.register_loop("worker")
    health.register_loop("files")
    clock.now += 12.4

    assert health.liveness() == (
        False,
        "loop files silent for 12s (limit 10s); loop worker silent for 12s (limit 10s)",
    )


def test_a_readiness_reason_is_kept_to_one_short_line() -> None:
    health = Health()
    health.set_ready(False, "source ns/a is invalid:\n  line two\n" + "x" * 1000)

    ready, reason = health.readiness()

    assert not ready
    assert reason.startswith("source ns/a is invalid: line two x")
    assert "\n" not in reason and len(reason) <= 300
    assert reason.endswith(" more characters)")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (":9464", BindAddress("", 9464)),
        ("127.0.0.1:0", BindAddress("127.0.0.1", 0)),
        ("[::]:9464", BindAddress("::", 9464)),
        ("[::1]:80", BindAddress("::1", 80)),
        ("localhost:9464", BindAddress("localhost", 9464)),
    ],
)
def test_listen_addresses_are_parsed(address: str, expected: BindAddress) -> None:
    assert BindAddress.parse(address) == expected


@pytest.mark.parametrize("address", ["9464", "::1:9464", "host:port", "host:", "h:70000", ""])
def test_malformed_listen_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        BindAddress.parse(address)


# --- bounds: what one client may cost ---------------------------------------------------------


@pytest.fixture
def bounded() -> Iterator[Served]:
    """A server with small limits, so that the tests reach them quickly."""
    clock = FakeClock()
    metrics = AgentMetrics(CollectorRegistry())
    health = Health(clock=clock, stale_after=60.0)
    limits = ServerLimits(connections=8, header_bytes=1024, request_seconds=0.5)
    server = StatusServer("127.0.0.1:0", metrics=metrics, health=health, limits=limits)
    server.start()
    yield Served(server, metrics, health, clock)
    server.stop()


def connect(served: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.server.port), timeout=5)


def closed_by_the_server(conn: socket.socket) -> bool:
    """Whether the server has closed `conn` (EOF or reset), waiting up to 3 s for it."""
    conn.settimeout(3)
    try:
        while conn.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_idle_connections_cost_no_thread_each(served: Served) -> None:
    before = threading.active_count()
    connections = [connect(served) for _ in range(200)]
    try:
        assert served.get("/healthz").status == 200
        assert threading.active_count() <= before + 1
    finally:
        for conn in connections:
            conn.close()


def test_the_oldest_connection_makes_way_when_the_cap_is_reached(bounded: Served) -> None:
    idle = [connect(bounded) for _ in range(8)]
    try:
        assert bounded.get("/healthz").status == 200
        assert closed_by_the_server(idle[0])
    finally:
        for conn in idle:
            conn.close()


def test_headers_beyond_the_limit_are_answered_431(bounded: Served) -> None:
    head = b"GET /healthz HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 2000 + b"\r\n\r\n"
    with connect(bounded) as conn:
        conn.sendall(head)
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.0 431 ")


def test_headers_that_never_end_are_answered_431_without_waiting_for_the_end(
    bounded: Served,
) -> None:
    with connect(bounded) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nX-Filler: " + b"a" * 1100)
        assert conn.recv(4096).startswith(b"HTTP/1.0 431 ")


def test_a_client_that_trickles_is_cut_at_the_request_deadline(bounded: Served) -> None:
    with connect(bounded) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(3):
            time.sleep(0.3)
            with suppress(OSError):
                conn.sendall(b"X: y\r\n")
        assert closed_by_the_server(conn)
    assert bounded.get("/healthz").status == 200


class CountingCollector(Collector):
    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        yield GaugeMetricFamily("node_agent_test_renders", "renders of the registry", value=1)


def test_metrics_are_not_rendered_for_a_client_that_has_left(served: Served) -> None:
    counting = CountingCollector()
    served.metrics.registry.register(counting)
    for _ in range(20):
        with connect(served) as conn:
            # Corked, the request and the FIN leave in one segment: the server never sees the
            # request without seeing that the client has gone.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.shutdown(socket.SHUT_RDWR)
    assert served.get("/healthz").status == 200  # the loop has handled every connection
    assert counting.calls == 0
    assert "node_agent_test_renders" in served.get("/metrics").text
    assert counting.calls == 1
