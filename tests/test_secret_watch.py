"""SecretWatcher follows one Secret through the API, against a real HTTP API server.

The real `kubernetes` client talks to `tests/kubeapi.py` through a kubeconfig; faults are
injected on the server side. Timeouts are short so the file runs in seconds.
"""

from __future__ import annotations

import base64
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from kubeapi import SECRETS, KubeApiServer
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from support.waiting import wait_until

from node_agent.backoff import Backoff
from node_agent.kube.client import KubeApi, load_api_client
from node_agent.kube.errors import (
    ApiForbidden,
    ApiUnavailable,
    ErrorReason,
    WatchExpired,
)
from node_agent.kube.model import ObjectRef
from node_agent.kube.secret_watch import (
    RestartCause,
    SecretContent,
    SecretSnapshot,
    SecretWatcher,
    WatchSettings,
)

NS = "kube-system"
NAME = "registry-credentials"
DOCKERCONFIG = "kubernetes.io/dockerconfigjson"
PASSWORD_1 = b'{"auths": {"registry.example.com": {"auth": "dXNlcjpodW50ZXIy"}}}'
PASSWORD_2 = b'{"auths": {"registry.example.com": {"auth": "dXNlcjpjb3JyZWN0aG9yc2U="}}}'

FAST = WatchSettings(
    watch_timeout_seconds=10,
    connect_timeout=1.0,
    list_read_timeout=2.0,
    watch_read_timeout=0.5,  # the server sends a bookmark every 0.1 s
    backoff_initial=0.05,
    backoff_max=0.2,
)


class AlwaysCeiling(random.Random):
    """Jitter that always picks the longest delay, so request counts are predictable."""

    def random(self) -> float:
        return 1.0


@dataclass
class Recorder:
    """Collects what the watcher reports, from its thread, for assertions in the test's."""

    snapshots: list[SecretSnapshot] = field(default_factory=list)
    errors: list[ErrorReason] = field(default_factory=list)
    restarts: list[RestartCause] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def on_change(self, snapshot: SecretSnapshot) -> None:
        with self._changed:
            self.snapshots.append(snapshot)
            self._changed.notify_all()

    def on_error(self, reason: ErrorReason) -> None:
        with self._changed:
            self.errors.append(reason)
            self._changed.notify_all()

    def on_watch_restart(self, cause: RestartCause) -> None:
        with self._changed:
            self.restarts.append(cause)
            self._changed.notify_all()

    def wait_for(self, condition: Callable[[Recorder], bool], timeout: float = 3.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: condition(self), timeout), self

    @property
    def states(self) -> list[bytes | None]:
        """The `.dockerconfigjson` of each report; None for "deleted"."""
        return [
            None if s.content is None else s.content.data[".dockerconfigjson"]
            for s in self.snapshots
        ]


@dataclass
class Followed:
    watcher: SecretWatcher
    seen: Recorder


Follow = Callable[..., Followed]


@pytest.fixture
def follow(kube_api: KubeApiServer) -> Iterator[Follow]:
    """Start a SecretWatcher on NS/NAME with the real client; stopped after the test."""
    running: list[tuple[SecretWatcher, KubeApi]] = []

    def start(*, settings: WatchSettings = FAST, rng: random.Random | None = None) -> Followed:
        assert kube_api.kubeconfig_path is not None
        api = KubeApi.connect(kubeconfig=kube_api.kubeconfig_path)
        seen = Recorder()
        watcher = SecretWatcher(
            NS,
            NAME,
            api=api,
            on_change=seen.on_change,
            on_error=seen.on_error,
            on_watch_restart=seen.on_watch_restart,
            settings=settings,
            rng=rng or random.Random(5),
        )
        running.append((watcher, api))
        watcher.start()
        return Followed(watcher, seen)

    yield start
    for watcher, api in running:
        assert watcher.stop(timeout=2.0), "the watcher did not stop"
        api.close()




def watching(kube_api: KubeApiServer) -> None:
    """Wait until the watcher has a watch open."""
    wait_until(lambda: kube_api.open_watches() == 1)


def verbs(kube_api: KubeApiServer) -> list[str]:
    return [r.verb for r in kube_api.requests(plural="secrets")]


# --- following the Secret -------------------------------------------------------------------


def test_reports_the_secret_found_by_the_initial_list(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    rv = kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1}, type=DOCKERCONFIG)

    seen = follow().seen

    seen.wait_for(lambda s: len(s.snapshots) == 1)
    assert seen.snapshots[0] == SecretSnapshot(
        SecretContent(DOCKERCONFIG, {".dockerconfigjson": PASSWORD_1}), rv
    )


def test_starts_with_one_list_then_one_watch_from_the_lists_resource_version(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    kube_api.create_secret(NS, "someone-elses", {"x": b"y"})

    follow()
    watching(kube_api)
    time.sleep(0.25)  # several bookmarks later: still the same single watch

    first_list, first_watch = kube_api.requests(plural="secrets")
    assert (first_list.verb, first_watch.verb) == ("list", "watch")
    assert first_list.query["fieldSelector"] == f"metadata.name={NAME}"
    assert first_watch.query == {
        "fieldSelector": f"metadata.name={NAME}",
        "resourceVersion": "2",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "10",
        "watch": "true",
    }


def test_a_secret_created_after_start_is_reported_after_its_absence(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    seen = follow().seen
    watching(kube_api)

    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    assert seen.states == [None, PASSWORD_1]


def test_updates_and_a_deletion_are_followed(kube_api: KubeApiServer, follow: Follow) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_2})
    deleted_at = kube_api.delete_secret(NS, NAME)
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})

    seen.wait_for(lambda s: len(s.snapshots) == 4)
    assert seen.states == [PASSWORD_1, PASSWORD_2, None, PASSWORD_1]
    assert seen.snapshots[2] == SecretSnapshot(None, deleted_at)
    assert verbs(kube_api) == ["list", "watch"]


def test_changes_that_leave_the_content_alone_are_not_reported(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    kube_api.touch_secret(NS, NAME)  # an annotation: new resourceVersion, same data
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_2})

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    assert seen.states == [PASSWORD_1, PASSWORD_2]


def test_only_the_followed_secret_is_reported(kube_api: KubeApiServer, follow: Follow) -> None:
    seen = follow().seen
    watching(kube_api)

    kube_api.create_secret(NS, "someone-elses", {"x": b"y"})
    kube_api.create_secret("other-namespace", NAME, {"x": b"y"})
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    assert seen.states == [None, PASSWORD_1]


# --- resourceVersion bookkeeping ------------------------------------------------------------


def test_bookmarks_move_the_resume_point_past_unrelated_changes(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    follow()
    watching(kube_api)
    for i in range(5):
        unrelated = kube_api.create_secret(NS, f"unrelated-{i}", {"x": b"y"})
    time.sleep(0.25)  # a few bookmarks

    kube_api.drop_watches()

    wait_until(lambda: len(kube_api.requests(verb="watch")) == 2)
    resumed = kube_api.requests(verb="watch")[1]
    assert resumed.query["resourceVersion"] == unrelated


def test_a_watch_ended_by_its_server_timeout_is_resumed_without_a_list(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow(settings=replace(FAST, watch_timeout_seconds=1)).seen

    seen.wait_for(lambda s: len(s.restarts) >= 1, timeout=3.0)
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_2})

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    assert seen.restarts[0] == "timeout"
    assert seen.errors == []
    assert verbs(kube_api)[:3] == ["list", "watch", "watch"]


def test_410_gone_relists_and_catches_an_update_made_in_the_gap(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    with kube_api.outage():
        kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_2})
        kube_api.compact()  # the watcher's resourceVersion is now too old
        time.sleep(0.1)

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    watching(kube_api)
    assert seen.states == [PASSWORD_1, PASSWORD_2]
    assert "expired" in seen.restarts
    assert verbs(kube_api)[-3:] == ["watch", "list", "watch"]  # 410 on resume, then relist


def test_410_on_a_fresh_list_backs_off_instead_of_spinning(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    kube_api.fail_next(410, times=None, verb="watch")  # a server that never lets a watch start

    follow(rng=AlwaysCeiling())
    time.sleep(0.6)

    # Delays 0.05, 0.1, 0.2, 0.2 … s: a handful of list+watch rounds, not hundreds.
    assert 4 <= len(kube_api.requests(verb="list")) <= 6


def test_a_relist_with_the_same_content_reports_nothing(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    with kube_api.outage():
        kube_api.touch_secret(NS, NAME)
        kube_api.compact()

    wait_until(lambda: len(kube_api.requests(verb="list")) == 2)
    watching(kube_api)
    assert seen.states == [PASSWORD_1]


# --- broken streams and API failures --------------------------------------------------------


def test_a_dropped_watch_reconnects_and_catches_up_without_a_list(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    kube_api.fail_next(500, times=2, verb="watch")  # keep it away while the update happens
    kube_api.drop_watches()
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_2})

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    assert seen.states == [PASSWORD_1, PASSWORD_2]
    assert verbs(kube_api).count("list") == 1
    assert set(seen.errors) == {"unreachable"}


def test_a_stalled_watch_is_reopened_after_the_read_timeout(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    stalled_at = time.monotonic()
    assert kube_api.stall_watches() == 1
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_2})

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    assert time.monotonic() - stalled_at >= FAST.watch_read_timeout
    assert seen.errors == ["unreachable"]
    assert verbs(kube_api) == ["list", "watch", "watch"]


def test_server_errors_back_off_and_recover(kube_api: KubeApiServer, follow: Follow) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    kube_api.fail_next(500, times=None)

    seen = follow(rng=AlwaysCeiling()).seen
    time.sleep(0.5)

    # Delays 0.05, 0.1, 0.2, 0.2 … s: 4 or 5 attempts in half a second, and no report at all.
    assert 4 <= len(kube_api.requests()) <= 5
    assert seen.snapshots == []
    assert set(seen.errors) == {"unreachable"}

    kube_api.clear_faults()
    seen.wait_for(lambda s: len(s.snapshots) == 1)
    assert seen.states == [PASSWORD_1]


def test_an_outage_reports_nothing_and_is_caught_up_after(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    with kube_api.outage():
        kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_2})
        seen.wait_for(lambda s: len(s.errors) >= 3)
        assert seen.states == [PASSWORD_1]

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    assert seen.states == [PASSWORD_1, PASSWORD_2]
    assert set(seen.errors) == {"unreachable"}
    assert kube_api.refused_connections >= 2


def test_a_deletion_during_an_outage_is_reported_once_the_api_confirms_it(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    with kube_api.outage():
        kube_api.delete_secret(NS, NAME)
        seen.wait_for(lambda s: len(s.errors) >= 2)
        assert seen.states == [PASSWORD_1]

    seen.wait_for(lambda s: len(s.snapshots) == 2)
    assert seen.states == [PASSWORD_1, None]


def test_forbidden_is_reported_clearly_and_deletes_nothing(
    kube_api: KubeApiServer, follow: Follow, caplog: pytest.LogCaptureFixture
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    kube_api.fail_next(403, times=None)

    seen = follow().seen
    seen.wait_for(lambda s: len(s.errors) >= 2)

    assert seen.snapshots == []
    assert set(seen.errors) == {"forbidden"}
    (rbac_line,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "RBAC forbids list on secrets in namespace kube-system" in rbac_line.getMessage()
    assert f"Secret {NAME!r}" in rbac_line.getMessage()

    kube_api.clear_faults()  # RBAC fixed: no restart needed
    seen.wait_for(lambda s: len(s.snapshots) == 1)
    assert seen.states == [PASSWORD_1]


def test_a_long_api_message_is_cut_at_a_word_saying_how_much_was_left_out(
    kube_api: KubeApiServer, follow: Follow, caplog: pytest.LogCaptureFixture
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    words = " ".join(f"word{i}" for i in range(200))  # 1,289 characters
    kube_api.fail_next(500, times=None, message=f"etcdserver: {words} last-word")

    follow().seen.wait_for(lambda s: len(s.errors) >= 1)

    line = next(r.getMessage() for r in caplog.records if "etcdserver" in r.getMessage())
    shown = line.partition("etcdserver: ")[2].partition(" …(")[0]
    assert shown and all(re.fullmatch(r"word\d+", word) for word in shown.split())
    left_out = int(line.partition(" …(")[2].partition(" more characters)")[0])
    assert len("etcdserver: ") + len(shown) + left_out == len(
        f"etcdserver: {words} last-word"
    )
    assert "last-word" not in line
    kube_api.clear_faults()


def test_losing_watch_permission_keeps_the_last_state(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)

    kube_api.fail_next(403, times=None, verb="watch")
    kube_api.drop_watches()
    seen.wait_for(lambda s: "forbidden" in s.errors)

    assert seen.states == [PASSWORD_1]
    assert verbs(kube_api).count("list") == 1  # no list storm either


def test_undecodable_secret_data_is_reported_invalid_until_fixed(
    kube_api: KubeApiServer, follow: Follow
) -> None:
    broken = {"metadata": {"name": NAME}, "data": {".dockerconfigjson": "not base64!"}}
    kube_api.store.create(SECRETS, NS, broken)

    seen = follow().seen
    seen.wait_for(lambda s: "invalid" in s.errors)
    assert seen.snapshots == []

    kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen.wait_for(lambda s: len(s.snapshots) == 1)
    assert seen.states == [PASSWORD_1]


# --- stopping ---------------------------------------------------------------------------------


def test_stop_ends_a_stalled_stream_promptly(kube_api: KubeApiServer, follow: Follow) -> None:
    patient = replace(FAST, watch_read_timeout=60.0)
    followed = follow(settings=patient)
    watching(kube_api)
    kube_api.stall_watches()

    started = time.monotonic()
    assert followed.watcher.stop(timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert followed.seen.errors == []


def test_stop_ends_a_backoff_wait_promptly(kube_api: KubeApiServer, follow: Follow) -> None:
    kube_api.fail_next(500, times=None)
    slow = replace(FAST, backoff_initial=30.0, backoff_max=30.0)
    followed = follow(settings=slow, rng=AlwaysCeiling())
    followed.seen.wait_for(lambda s: len(s.errors) == 1)

    started = time.monotonic()
    assert followed.watcher.stop(timeout=2.0)
    assert time.monotonic() - started < 1.0


# --- secrecy --------------------------------------------------------------------------------


def test_secret_data_never_reaches_logs_or_reprs(
    kube_api: KubeApiServer, follow: Follow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kube_api.create_secret(NS, NAME, {".dockerconfigjson": PASSWORD_1})
    seen = follow().seen
    watching(kube_api)
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": PASSWORD_2})
    kube_api.fail_next(500, verb="watch")
    kube_api.drop_watches()
    seen.wait_for(lambda s: len(s.snapshots) == 2 and len(s.errors) >= 1)

    text = caplog.text + repr(seen.snapshots)
    for secret in (PASSWORD_1, PASSWORD_2):
        assert secret.decode() not in text
        assert base64.b64encode(secret).decode() not in text
    assert "keys ['.dockerconfigjson']" in caplog.text


# --- pieces ---------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap_and_restarts_after_reset() -> None:
    backoff = Backoff(initial=1.0, maximum=60.0, rng=AlwaysCeiling())

    delays = [backoff.next_delay() for _ in range(9)]
    backoff.reset()

    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff.next_delay() == 1


def test_backoff_jitter_stays_within_the_ceiling() -> None:
    backoff = Backoff(initial=1.0, maximum=4.0, rng=random.Random(3))

    delays = [backoff.next_delay() for _ in range(200)]

    assert all(0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) == 200  # spread out, not in lockstep


@pytest.fixture
def agent_api(kube_api: KubeApiServer) -> Iterator[KubeApi]:
    api = KubeApi.connect(kubeconfig=kube_api.kubeconfig_path)
    yield api
    api.close()


@pytest.fixture
def core_v1(kube_api: KubeApiServer) -> Iterator[k8s.CoreV1Api]:
    """The official client's CoreV1Api on the test server, configured like the agent's."""
    api_client = load_api_client(kubeconfig=kube_api.kubeconfig_path)
    yield k8s.CoreV1Api(api_client)
    api_client.close()  # type: ignore[no-untyped-call]  # the client leaves it unannotated


def test_an_explicit_kubeconfig_wins_over_the_in_cluster_environment(
    kube_api: KubeApiServer,
) -> None:
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}

    api = KubeApi(load_api_client(kubeconfig=kube_api.kubeconfig_path, environ=in_cluster))
    try:
        listing = api.list_secret(ObjectRef(NS, NAME), request_timeout=(1, 1))
    finally:
        api.close()
    assert listing.items == []


def test_the_client_keeps_tcp_connections_alive(core_v1: k8s.CoreV1Api) -> None:
    assert core_v1.api_client.configuration.keep_alive is True


def test_kubeconfig_env_is_used_outside_a_cluster(kube_api: KubeApiServer) -> None:
    api = KubeApi.connect(environ={"KUBECONFIG": str(kube_api.kubeconfig_path)})
    try:
        listing = api.list_secret(ObjectRef(NS, NAME), request_timeout=(1, 1))
    finally:
        api.close()
    assert listing.items == []


def test_client_errors_become_the_agents_own(kube_api: KubeApiServer, agent_api: KubeApi) -> None:
    kube_api.fail_next(403)
    with pytest.raises(ApiForbidden, match="RBAC forbids list"):
        agent_api.list_secret(ObjectRef(NS, NAME), request_timeout=(1, 1))

    kube_api.fail_next(500)
    with pytest.raises(ApiUnavailable, match="API answered 500"):
        agent_api.list_secret(ObjectRef(NS, NAME), request_timeout=(1, 1))

    kube_api.fail_next(410, verb="watch")  # inside the stream, as the real API server does
    stream = agent_api.watch_secret(
        ObjectRef(NS, NAME), resource_version="1", timeout_seconds=1, request_timeout=(1, 1)
    )
    with pytest.raises(WatchExpired):
        list(stream)
    stream.close()

    with kube_api.outage(), pytest.raises(ApiUnavailable, match="cannot reach"):
        agent_api.list_secret(ObjectRef(NS, NAME), request_timeout=(1, 1))


# --- the test API server speaks enough Kubernetes for the daemon ----------------------------


def test_the_server_creates_and_patches_node_events(
    kube_api: KubeApiServer, core_v1: k8s.CoreV1Api
) -> None:
    created = core_v1.create_namespaced_event(
        "default",
        k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(generate_name="node-1."),
            involved_object=k8s.V1ObjectReference(kind="Node", name="node-1"),
            reason="RegistryCredentialsApplied",
            count=1,
        ),
    )
    assert created.metadata is not None and created.metadata.name is not None

    core_v1.patch_namespaced_event(created.metadata.name, "default", {"count": 2})

    (event,) = kube_api.events("default", reason="RegistryCredentialsApplied")
    assert event["count"] == 2
    assert event["involvedObject"]["name"] == "node-1"


def test_the_server_rejects_a_stale_update_with_409(
    kube_api: KubeApiServer, core_v1: k8s.CoreV1Api
) -> None:
    old = kube_api.create_secret(NS, NAME, {"k": b"1"})
    kube_api.update_secret(NS, NAME, {"k": b"2"})
    stale = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=NAME, resource_version=old))

    with pytest.raises(k8s.ApiException) as raised:
        core_v1.replace_namespaced_secret(NAME, NS, stale)

    assert raised.value.status == 409


def test_the_server_answers_a_stale_continue_token_with_http_410(
    kube_api: KubeApiServer, core_v1: k8s.CoreV1Api
) -> None:
    for i in range(3):
        kube_api.create_secret(NS, f"s{i}", {"k": b"v"})
    page = core_v1.list_namespaced_secret(NS, limit=2)
    assert page.metadata is not None
    kube_api.update_secret(NS, "s0", {"k": b"changed"})
    kube_api.compact()  # the first page's revision is gone

    with pytest.raises(k8s.ApiException) as raised:
        core_v1.list_namespaced_secret(NS, limit=2, _continue=page.metadata.var_continue)

    assert raised.value.status == 410


def test_the_server_answers_a_missing_object_with_a_404_status(core_v1: k8s.CoreV1Api) -> None:
    with pytest.raises(k8s.ApiException) as raised:
        core_v1.read_namespaced_secret(NAME, NS)

    assert raised.value.status == 404
    assert '"reason": "NotFound"' in str(raised.value.body)


def test_a_watch_without_resource_version_starts_with_the_current_state(
    kube_api: KubeApiServer, agent_api: KubeApi
) -> None:
    rv = kube_api.create_secret(NS, NAME, {"k": b"v"})

    stream = agent_api.watch_secret(
        ObjectRef(NS, NAME), resource_version="0", timeout_seconds=1, request_timeout=(1, 2)
    )
    events = list(stream)
    stream.close()

    assert events[0].type == "ADDED"
    assert events[0].object["metadata"]["resourceVersion"] == rv
    assert {e.type for e in events[1:]} == {"BOOKMARK"}


# --- facts about the official client (kubernetes 37) that the design rests on ---------------


def _expired_watch(kube_api: KubeApiServer, core_v1: k8s.CoreV1Api, **kwargs: object) -> int:
    kube_api.create_secret(NS, NAME, {"k": b"v"})
    kube_api.update_secret(NS, NAME, {"k": b"w"})
    kube_api.compact()
    watch: Any = k8s_watch.Watch()  # type: ignore[no-untyped-call]  # unannotated in the client
    events = watch.stream(core_v1.list_namespaced_secret, NS, resource_version="1", **kwargs)
    with pytest.raises(k8s.ApiException) as raised:
        list(events)
    return int(raised.value.status)


def test_client_fact_watch_helper_retries_410_once_then_raises(
    kube_api: KubeApiServer, core_v1: k8s.CoreV1Api
) -> None:
    assert _expired_watch(kube_api, core_v1) == 410
    assert [r.query["resourceVersion"] for r in kube_api.requests(verb="watch")] == ["1", "1"]


def test_client_fact_watch_helper_with_a_timeout_raises_410_at_once(
    kube_api: KubeApiServer, core_v1: k8s.CoreV1Api
) -> None:
    assert _expired_watch(kube_api, core_v1, timeout_seconds=1) == 410
    assert len(kube_api.requests(verb="watch")) == 1
