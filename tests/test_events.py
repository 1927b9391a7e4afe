"""Node Events, deduplicated, through the real `kubernetes` client and the test API server.

Time for deduplication comes from a fake clock; delivery runs on the recorder's thread, so
each test waits with `flush()` before it looks at the server.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubeapi import EVENTS, TOKEN, KubeApiServer

from node_agent.kube.client import KubeApi
from node_agent.kube.errors import ApiForbidden, ApiUnavailable
from node_agent.kube.events import NodeEventRecorder
from node_agent.kube.model import EventApi, ObjectRef, RequestTimeout

NODE = "node-1"
APPLIED = "RegistryCredentialsApplied"
INVALID = "RegistryCredentialsInvalid"
APPLIED_MESSAGE = (
    "applied registries registry.example.com, ghcr.io to /etc/containerd/config.toml "
    "and /var/lib/kubelet/config.json"
)
START = datetime(2026, 11, 2, 8, 30, 0, tzinfo=UTC)


@dataclass
class FakeClock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


MakeRecorder = Callable[..., NodeEventRecorder]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()




@pytest.fixture
def make_recorder(clock: FakeClock) -> Iterator[MakeRecorder]:
    """Recorders for NODE on the fake clock, closed (and checked to end) after the test."""
    made: list[NodeEventRecorder] = []

    def make(
        api: EventApi,
        *,
        cache_size: int = 64,
        max_pending: int = 64,
        request_timeout: RequestTimeout = (1.0, 1.0),
    ) -> NodeEventRecorder:
        recorder = NodeEventRecorder(
            api,
            node_name=NODE,
            clock=clock,
            cache_size=cache_size,
            max_pending=max_pending,
            request_timeout=request_timeout,
        )
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        assert recorder.close(timeout=5), "the event thread did not end"


@pytest.fixture
def recorder(make_recorder: MakeRecorder, agent_api: KubeApi) -> NodeEventRecorder:
    return make_recorder(agent_api)


def parse_time(timestamp: str) -> datetime:
    """RFC 3339, as the client sends it (37.x: `+00:00`; the API server answers `Z`)."""
    return datetime.fromisoformat(timestamp)


def event_verbs(kube_api: KubeApiServer) -> list[str]:
    return [r.verb for r in kube_api.requests(plural="events")]


def problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "node_agent.kube.events" and r.levelno >= logging.WARNING
    ]


# --- creating and deduplicating ------------------------------------------------------------


def test_the_first_event_is_created_about_the_node(
    kube_api: KubeApiServer, recorder: NodeEventRecorder
) -> None:
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()

    (event,) = kube_api.events("default")
    assert event["metadata"]["name"].startswith(f"{NODE}.")
    assert event["metadata"]["namespace"] == "default"
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Node",
        "name": NODE,
        "uid": NODE,
    }
    assert (event["reason"], event["message"], event["type"]) == (
        APPLIED,
        APPLIED_MESSAGE,
        "Normal",
    )
    assert event["source"] == {"component": "node-agent", "host": NODE}
    assert parse_time(event["firstTimestamp"]) == parse_time(event["lastTimestamp"]) == START
    assert event["count"] == 1
    assert event["reportingComponent"] == "node-agent"
    assert event["reportingInstance"] == f"node-agent-{NODE}"
    assert event_verbs(kube_api) == ["create"]


def test_a_warning_keeps_its_type(kube_api: KubeApiServer, recorder: NodeEventRecorder) -> None:
    recorder.record(INVALID, "kube-system/registry-credentials: no auths", type="Warning")
    assert recorder.flush()

    (event,) = kube_api.events("default", reason=INVALID)
    assert event["type"] == "Warning"


def test_a_repeated_event_bumps_the_count_of_the_one_posted(
    kube_api: KubeApiServer, recorder: NodeEventRecorder, clock: FakeClock
) -> None:
    recorder.record(APPLIED, APPLIED_MESSAGE)
    for _ in range(3):
        clock.advance(90)
        recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()

    (event,) = kube_api.events("default")
    assert event["count"] == 4
    assert parse_time(event["firstTimestamp"]) == START
    assert parse_time(event["lastTimestamp"]) == START + timedelta(seconds=270)
    assert event_verbs(kube_api) == ["create", "patch", "patch", "patch"]


def test_a_different_message_or_type_is_a_new_event(
    kube_api: KubeApiServer, recorder: NodeEventRecorder
) -> None:
    recorder.record(APPLIED, APPLIED_MESSAGE)
    recorder.record(APPLIED, "applied registries registry.example.com to config.toml")
    recorder.record(APPLIED, APPLIED_MESSAGE, type="Warning")
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()

    events = kube_api.events("default")
    assert sorted((e["message"], e["type"], e["count"]) for e in events) == [
        ("applied registries registry.example.com to config.toml", "Normal", 1),
        (APPLIED_MESSAGE, "Normal", 2),
        (APPLIED_MESSAGE, "Warning", 1),
    ]
    assert event_verbs(kube_api) == ["create", "create", "create", "patch"]


def test_the_window_runs_from_the_last_occurrence(
    kube_api: KubeApiServer, recorder: NodeEventRecorder, clock: FakeClock
) -> None:
    recorder.record(APPLIED, APPLIED_MESSAGE)
    clock.advance(500)
    recorder.record(APPLIED, APPLIED_MESSAGE)
    clock.advance(500)  # 1000 s after the first, 500 s after the last: still the same event
    recorder.record(APPLIED, APPLIED_MESSAGE)
    clock.advance(601)  # quiet for longer than the window: a new event
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()

    assert [e["count"] for e in kube_api.events("default")] == [3, 1]
    assert event_verbs(kube_api) == ["create", "patch", "patch", "create"]


def test_an_event_expired_on_the_server_is_created_again(
    kube_api: KubeApiServer, recorder: NodeEventRecorder
) -> None:
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()
    (first,) = kube_api.events("default")
    kube_api.store.delete(EVENTS, "default", first["metadata"]["name"])  # the event TTL

    recorder.record(APPLIED, APPLIED_MESSAGE)
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()

    (again,) = kube_api.events("default")
    assert again["metadata"]["name"] != first["metadata"]["name"]
    assert again["count"] == 2
    assert event_verbs(kube_api) == ["create", "patch", "create", "patch"]


def test_the_cache_of_posted_events_is_bounded_least_recently_used_first(
    kube_api: KubeApiServer, make_recorder: MakeRecorder, agent_api: KubeApi
) -> None:
    recorder = make_recorder(agent_api, cache_size=2)
    for message in ["a", "b", "a", "c", "a", "b"]:  # "c" evicts "b", the least recently used
        recorder.record(APPLIED, message)
    assert recorder.flush()

    assert event_verbs(kube_api) == ["create", "create", "patch", "create", "patch", "create"]
    counts = sorted((e["message"], e["count"]) for e in kube_api.events("default"))
    assert counts == [("a", 3), ("b", 1), ("b", 1), ("c", 1)]


def test_a_long_message_is_cut_at_a_word_within_1024_characters_saying_how_much_is_left_out(
    kube_api: KubeApiServer, recorder: NodeEventRecorder
) -> None:
    recorder.record(APPLIED, "registry.example.com " * 200)
    assert recorder.flush()

    (event,) = kube_api.events("default")
    shown, _, note = event["message"].partition(" …(")
    assert len(event["message"]) <= 1024
    assert set(shown.split()) == {"registry.example.com"}
    assert note == f"{len('registry.example.com ' * 200) - len(shown)} more characters)"


def test_close_delivers_what_is_queued_and_later_events_are_dropped(
    kube_api: KubeApiServer, recorder: NodeEventRecorder
) -> None:
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.close(timeout=5)
    recorder.record(INVALID, "after close", type="Warning")

    assert [e["reason"] for e in kube_api.events("default")] == [APPLIED]


def test_closing_a_recorder_that_never_recorded_is_immediate(recorder: NodeEventRecorder) -> None:
    assert recorder.close(timeout=0)


# --- failures never reach the caller -------------------------------------------------------


def test_an_api_outage_is_logged_once_and_recording_resumes_after_it(
    kube_api: KubeApiServer, recorder: NodeEventRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.kube.events")
    with kube_api.outage():
        started = time.monotonic()
        for attempt in range(5):
            recorder.record(APPLIED, f"attempt {attempt}")
        returned_after = time.monotonic() - started
        assert recorder.flush()

    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()

    assert returned_after < 0.1
    (logged,) = problems(caplog)
    assert logged.levelno == logging.WARNING
    assert "cannot reach the API server" in logged.getMessage()
    assert "(1 dropped so far)" in logged.getMessage()
    assert "delivered again (5 dropped meanwhile)" in caplog.text
    assert [e["message"] for e in kube_api.events("default")] == [APPLIED_MESSAGE]


def test_forbidden_is_logged_clearly_once(
    kube_api: KubeApiServer, recorder: NodeEventRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    kube_api.fail_next(403, times=None, verb="create")
    recorder.record(APPLIED, APPLIED_MESSAGE)
    recorder.record(INVALID, "kube-system/registry-credentials: no auths", type="Warning")
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()

    (logged,) = problems(caplog)
    assert logged.levelno == logging.ERROR
    assert "RBAC forbids create on events in namespace default (403)" in logged.getMessage()
    assert "allow the agent's ServiceAccount to create and patch events" in logged.getMessage()
    assert kube_api.events("default") == []


def test_a_lasting_failure_is_logged_again_after_ten_minutes(
    kube_api: KubeApiServer,
    recorder: NodeEventRecorder,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube_api.fail_next(403, times=None, verb="create")
    for _ in range(4):
        recorder.record(APPLIED, APPLIED_MESSAGE)
        clock.advance(300)
    assert recorder.flush()

    logged = [r.getMessage() for r in problems(caplog)]
    assert len(logged) == 2  # at 0 s and at 600 s, not at 300 s and 900 s
    assert logged[0].endswith("(1 dropped so far)")
    assert logged[1].endswith("(3 dropped so far)")


def test_a_server_error_on_patch_drops_that_occurrence_only(
    kube_api: KubeApiServer, recorder: NodeEventRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()
    kube_api.fail_next(500, verb="patch")
    recorder.record(APPLIED, APPLIED_MESSAGE)
    recorder.record(APPLIED, APPLIED_MESSAGE)
    assert recorder.flush()

    (event,) = kube_api.events("default")
    assert event["count"] == 2
    (logged,) = problems(caplog)
    assert "patch events: API answered 500" in logged.getMessage()


@pytest.fixture
def silent_api(tmp_path: Path) -> Iterator[KubeApi]:
    """An API server that accepts connections and never answers (a black-holed proxy)."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        kubeconfig = tmp_path / "silent-kubeconfig"
        server = f"http://127.0.0.1:{listener.getsockname()[1]}"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "silent", "cluster": {"server": server}}],
                    "users": [{"name": "agent", "user": {"token": TOKEN}}],
                    "contexts": [{"name": "c", "context": {"cluster": "silent", "user": "agent"}}],
                    "current-context": "c",
                }
            )
        )
        api = KubeApi.connect(kubeconfig=kubeconfig)
        yield api
        api.close()


def test_a_hanging_api_never_delays_the_caller_and_the_queue_is_bounded(
    make_recorder: MakeRecorder, silent_api: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = make_recorder(silent_api, max_pending=2, request_timeout=(0.2, 0.2))

    started = time.monotonic()
    for attempt in range(20):
        recorder.record(APPLIED, f"attempt {attempt}")
    returned_after = time.monotonic() - started
    assert recorder.flush(timeout=5)

    assert returned_after < 0.1
    messages = [r.getMessage() for r in problems(caplog)]
    assert messages[0] == "Node events: 2 events wait for the API server; dropping new ones"
    assert len(messages) == 2  # the overflow and the failure, each once
    assert "cannot reach the API server" in messages[1]


def test_record_never_raises_even_when_the_clock_fails(
    agent_api: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_clock() -> datetime:
        raise OSError("clock unavailable")

    recorder = NodeEventRecorder(agent_api, node_name=NODE, clock=broken_clock)
    recorder.record(APPLIED, APPLIED_MESSAGE)

    assert "could not queue event RegistryCredentialsApplied" in caplog.text
    assert recorder.close(timeout=1)


# --- the client calls underneath -----------------------------------------------------------


def node_event(name: str | None) -> dict[str, Any]:
    metadata = {"name": name} if name else {"generateName": f"{NODE}."}
    return {
        "metadata": metadata,
        "involvedObject": {"kind": "Node", "name": NODE},
        "reason": APPLIED,
        "count": 1,
    }


def test_the_client_patches_with_a_merge_patch_and_answers_none_for_a_missing_event(
    kube_api: KubeApiServer, agent_api: KubeApi
) -> None:
    created = agent_api.create_event("default", node_event(None), request_timeout=(1, 1))
    ref = ObjectRef("default", created["metadata"]["name"])

    patched = agent_api.patch_event(ref, {"count": 2}, request_timeout=(1, 1))
    missing = agent_api.patch_event(
        ObjectRef("default", "node-1.gone"), {"count": 2}, request_timeout=(1, 1)
    )

    assert patched is not None and patched["count"] == 2
    assert patched["reason"] == APPLIED
    assert missing is None


def test_the_client_translates_event_errors(kube_api: KubeApiServer, agent_api: KubeApi) -> None:
    kube_api.fail_next(403, verb="create")
    with pytest.raises(ApiForbidden, match="RBAC forbids create on events"):
        agent_api.create_event("default", node_event("x"), request_timeout=(1, 1))

    kube_api.fail_next(500, verb="patch")
    with pytest.raises(ApiUnavailable, match="patch events: API answered 500"):
        agent_api.patch_event(ObjectRef("default", "x"), {"count": 2}, request_timeout=(1, 1))

    with kube_api.outage(), pytest.raises(ApiUnavailable, match="create events: cannot reach"):
        agent_api.create_event("default", node_event("y"), request_timeout=(1, 1))
