"""The daemon's parts on their own: the queue's timing rule, the sources'
"last good credentials" rules, drift classification, readiness, and the `run` flags."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.dockerconfig import docker_config, login
from support.events import RecordedEvents

from node_agent.cli import build_parser, daemon_settings_from, main
from node_agent.credentials import RegistryAuth
from node_agent.daemon.credential_sources import CredentialSources
from node_agent.daemon.outcomes import Settled, read_fingerprint, written_targets
from node_agent.daemon.reporting import (
    RECONCILE_FAILED,
    ROLLED_BACK,
    DaemonReporter,
    Readiness,
    readiness_of,
)
from node_agent.daemon.work_queue import Batch, Trigger, WorkQueue, next_run_at
from node_agent.daemon.worker import START, PassReport, Worker
from node_agent.kube.model import ObjectRef
from node_agent.kube.secret_watch import SecretContent, SecretSnapshot
from node_agent.metrics import AgentMetrics
from node_agent.ownership import StateStore
from node_agent.reconcile import NodeFile, Reconciler, fingerprint
from node_agent.settings import DaemonSettings, RestartCoordination
from node_agent.status_server import Health
from node_agent.targets import Entry
from node_agent.targets.kubelet import KubeletFormat

SECRET = ObjectRef("kube-system", "registry-credentials")
FALLBACK = ObjectRef("kube-system", "fallback")
DOCKERCONFIG = "kubernetes.io/dockerconfigjson"


def auths(**passwords: str) -> bytes:
    """A .dockerconfigjson with one `puller` credential per registry (`_` stands for `.`)."""
    return docker_config(
        {name.replace("_", "."): login(password) for name, password in passwords.items()}
    )


def snapshot(data: bytes | None, rv: str = "1") -> SecretSnapshot:
    content = None if data is None else SecretContent(DOCKERCONFIG, {".dockerconfigjson": data})
    return SecretSnapshot(content, rv)


# --- the queue's timing rule --------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "has_requests", "scheduled", "last_finished", "expected"),
    [
        ("nothing wanted", False, [], None, None),
        ("first request ever: at once", True, [], None, -math.inf),
        ("request after a quiet period: at once", True, [], 10.0, 10.2),
        ("request right after a pass: debounce after its end", True, [], 99.9, 100.1),
        ("scheduled: at its time", False, [50.0, 40.0], 10.0, 40.0),
        ("scheduled right after a pass: debounce after its end", False, [10.1], 10.0, 10.2),
        ("request and schedule: the request", True, [40.0], None, -math.inf),
    ],
)
def test_when_the_next_batch_is_handed_out(
    case: str,
    has_requests: bool,
    scheduled: list[float],
    last_finished: float | None,
    expected: float | None,
) -> None:
    at = next_run_at(
        has_requests=has_requests,
        scheduled=scheduled,
        last_finished=last_finished,
        debounce=0.2,
    )
    assert at == (pytest.approx(expected) if expected is not None else None), case


def test_the_first_request_after_a_quiet_period_is_handed_out_at_once() -> None:
    queue = WorkQueue(debounce=0.3)
    queue.finished()
    time.sleep(0.35)
    started = time.monotonic()
    queue.request(Trigger("source", "a/b"))
    assert queue.take(timeout=2) == Batch(frozenset({Trigger("source", "a/b")}))
    assert time.monotonic() - started < 0.05


def test_requests_during_and_right_after_a_pass_coalesce_into_one_batch() -> None:
    queue = WorkQueue(debounce=0.2)
    queue.request(Trigger("start"))
    assert queue.take(timeout=1) is not None
    for _ in range(50):  # while the pass runs
        queue.request(Trigger("source", "a/b"))
    queue.request(Trigger("node-file", "kubelet"))
    queue.finished()
    queue.request(Trigger("source", "a/b"))  # within the debounce after it
    ended = time.monotonic()
    batch = queue.take(timeout=1)
    assert batch == Batch(frozenset({Trigger("source", "a/b"), Trigger("node-file", "kubelet")}))
    assert time.monotonic() - ended == pytest.approx(0.2, abs=0.05)
    assert queue.take(timeout=0.3) is None


def test_a_scheduled_trigger_is_handed_out_when_due_and_the_earliest_schedule_wins() -> None:
    queue = WorkQueue(debounce=0.0)
    now = time.monotonic()
    queue.schedule(Trigger("restart"), at=now + 0.15)
    queue.schedule(Trigger("restart"), at=now + 5)
    assert queue.take(timeout=0.05) is None
    assert queue.take(timeout=1) == Batch(frozenset({Trigger("restart")}))
    assert time.monotonic() - now >= 0.15


def test_close_wakes_a_waiting_worker_at_once() -> None:
    queue = WorkQueue(debounce=0.2)
    taken: list[Batch | None] = []
    worker = threading.Thread(target=lambda: taken.append(queue.take(timeout=10)))
    worker.start()
    time.sleep(0.05)
    started = time.monotonic()
    queue.close()
    worker.join(2)
    assert taken == [None]
    assert time.monotonic() - started < 0.1


# --- sources ------------------------------------------------------------------------------


def test_sources_merge_by_priority_api_first_then_files_then_fallbacks(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret.json"
    secret_file.write_bytes(auths(a_example="from-file", b_example="from-file"))
    sources = CredentialSources(secrets=[SECRET], files=[secret_file], fallback_secrets=[FALLBACK])
    sources.refresh_files()
    sources.apply_secret(SECRET, snapshot(auths(a_example="from-api")))
    assert sources.merged() is None  # the fallback has not been read yet
    assert sources.waiting_for() == [str(FALLBACK)]
    sources.apply_secret(FALLBACK, snapshot(auths(b_example="fallback", c_example="fallback")))
    merged = sources.merged()
    assert merged is not None
    assert {registry: auth.password for registry, auth in merged.items()} == {
        "a.example": "from-api",
        "b.example": "from-file",
        "c.example": "fallback",
    }


def test_an_invalid_secret_keeps_the_last_good_credentials_until_it_is_valid_again() -> None:
    sources = CredentialSources(secrets=[SECRET])
    sources.apply_secret(SECRET, snapshot(auths(a_example="good")))
    change = sources.apply_secret(SECRET, snapshot(b"{not json", rv="2"))
    assert not change.credentials_changed
    assert change.new_problem is not None and "not valid JSON" in change.new_problem
    assert sources.merged() == {"a.example": RegistryAuth("puller", "good")}
    assert list(sources.problems()) == [str(SECRET)]
    change = sources.apply_secret(SECRET, snapshot(auths(a_example="new"), rv="3"))
    assert change.credentials_changed and change.new_problem is None
    assert sources.problems() == {}


def test_a_secret_invalid_from_the_start_is_never_merged_as_empty() -> None:
    sources = CredentialSources(secrets=[SECRET])
    sources.apply_secret(SECRET, snapshot(b'{"auths": 5}'))
    assert sources.merged() is None
    assert sources.waiting_for() == [str(SECRET)]


def test_an_opaque_secret_with_a_dockerconfigjson_key_is_used_and_warned_about_once_per_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sources = CredentialSources(secrets=[SECRET])
    opaque = SecretSnapshot(
        SecretContent("Opaque", {".dockerconfigjson": auths(a_example="pw")}), "1"
    )
    with caplog.at_level("WARNING"):
        assert sources.apply_secret(SECRET, opaque).credentials_changed
        sources.apply_secret(SECRET, SecretSnapshot(opaque.content, "2"))  # a relist: same
    assert sources.merged() == {"a.example": RegistryAuth("puller", "pw")}
    assert sources.problems() == {}
    (warning,) = [r.getMessage() for r in caplog.records if "Opaque" in r.getMessage()]
    assert warning.startswith(f"{SECRET}: type: Opaque, read as kubernetes.io/dockerconfigjson")


def test_an_opaque_secret_without_a_dockerconfigjson_key_is_invalid() -> None:
    sources = CredentialSources(secrets=[SECRET])
    content = SecretContent("Opaque", {"config.json": auths(a_example="pw")})
    change = sources.apply_secret(SECRET, SecretSnapshot(content, "1"))
    assert change.new_problem is not None and "type: found Opaque; expected" in change.new_problem
    assert sources.merged() is None


@pytest.mark.parametrize(("on_delete", "after"), [("remove", set()), ("keep", {"a.example"})])
def test_a_confirmed_deletion_removes_or_keeps(on_delete: str, after: set[str]) -> None:
    sources = CredentialSources(secrets=[SECRET], on_delete=on_delete)
    sources.apply_secret(SECRET, snapshot(auths(a_example="pw")))
    change = sources.apply_secret(SECRET, snapshot(None, rv="2"))
    assert change.credentials_changed == (on_delete == "remove")
    assert set(sources.merged() or {}) == after


def test_a_secret_absent_at_start_is_known_to_have_no_credentials() -> None:
    sources = CredentialSources(secrets=[SECRET], on_delete="keep")
    sources.apply_secret(SECRET, snapshot(None))
    assert sources.merged() == {}


def test_file_sources_are_parsed_again_only_when_their_bytes_change(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    path.write_bytes(auths(a_example="one"))
    sources = CredentialSources(files=[path])
    assert [c.credentials_changed for c in sources.refresh_files()] == [True]
    assert sources.refresh_files() == []
    path.write_bytes(b"garbage: [")
    (change,) = sources.refresh_files()
    assert change.new_problem is not None
    assert sources.refresh_files() == []  # the same problem is reported once
    path.unlink()
    (change,) = sources.refresh_files()
    assert change.new_problem is not None and "no such file" in change.new_problem
    assert sources.merged() == {"a.example": RegistryAuth("puller", "one")}
    path.write_bytes(auths(a_example="one"))
    (change,) = sources.refresh_files()  # valid again, with the same credentials
    assert change.recovered and not change.credentials_changed
    assert sources.problems() == {}


def test_a_secret_volume_directory_is_read_through_its_data_link(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    (volume / "..2026_01").mkdir(parents=True)
    (volume / "..2026_01" / ".dockerconfigjson").write_bytes(auths(a_example="v1"))
    (volume / "..data").symlink_to("..2026_01")
    (volume / ".dockerconfigjson").symlink_to("..data/.dockerconfigjson")
    sources = CredentialSources(files=[volume])
    sources.refresh_files()
    assert sources.merged() == {"a.example": RegistryAuth("puller", "v1")}


# --- drift, readiness ---------------------------------------------------------------------


def test_a_rewrite_with_unchanged_credentials_is_drift_and_a_new_credential_is_not(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.json"
    reconciler = Reconciler([NodeFile(KubeletFormat(), path)], StateStore(tmp_path / "state"))
    first = {"a.example": RegistryAuth("puller", "one")}
    outcome = reconciler.reconcile(first)
    (write,) = written_targets(outcome, first, applied={})
    assert (write.target, write.registries, write.drift) == ("kubelet", ("a.example",), False)
    path.write_text('{"auths": {}}')  # someone removes our entry
    (write,) = written_targets(reconciler.reconcile(first), first, applied={"kubelet": first})
    assert write.drift
    second = {"a.example": RegistryAuth("puller", "two")}
    (write,) = written_targets(reconciler.reconcile(second), second, applied={"kubelet": first})
    assert not write.drift
    assert written_targets(reconciler.reconcile(second), second, {"kubelet": second}) == []


def test_settled_holds_while_credentials_and_file_bytes_are_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}")
    credentials = {"a.example": RegistryAuth("puller", "one")}
    settled = Settled(credentials, {path: fingerprint(b"{}")})
    assert settled.still_holds(dict(credentials))
    assert not settled.still_holds({})
    path.write_text("{ }")
    assert not settled.still_holds(credentials)
    path.unlink()
    assert not settled.still_holds(credentials)


@pytest.mark.parametrize(
    ("first_pass_done", "problems", "waiting", "ready", "reason_part"),
    [
        (False, {}, [], False, "first successful reconcile"),
        (True, {}, [], True, "ok"),
        (True, {"ns/s": "ns/s: type: expected ..."}, [], False, "invalid credentials source"),
        (False, {}, ["ns/s"], False, "waiting for a first good read of ns/s"),
    ],
)
def test_readiness(
    first_pass_done: bool,
    problems: dict[str, str],
    waiting: list[str],
    ready: bool,
    reason_part: str,
) -> None:
    answer = readiness_of(first_pass_done=first_pass_done, problems=problems, waiting=waiting)
    assert answer[0] == ready
    assert reason_part in answer[1]


# --- the `run` command line ---------------------------------------------------------------


def parse_run(*args: str, env: dict[str, str] | None = None) -> DaemonSettings:
    environ = {"POD_NAMESPACE": "node-agent", **(env or {})}
    return daemon_settings_from(build_parser(environ).parse_args(["run", *args]))


def test_run_flags_and_defaults() -> None:
    settings = parse_run("--secret", "kube-system/creds", "--node-name", "n1", "--reload", "none")
    assert settings == daemon_settings_from(
        build_parser({"POD_NAMESPACE": "node-agent"}).parse_args(
            [
                "run",
                "--secret=kube-system/creds",
                "--node-name=n1",
                "--reload=none",
                "--resync-interval=5m",
                "--debounce=200ms",
                "--min-reload-interval=30s",
                "--metrics-address=:9464",
                "--on-secret-delete=remove",
                "--events",
            ]
        )
    )


def test_events_default_to_on_with_api_sources_and_need_a_node_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--node-name"):
        parse_run("--secret", "ns/creds")
    assert parse_run("--secret", "ns/creds", env={"NODE_NAME": "n1"}).node_name == "n1"
    env = {"NODE_NAME": "n1", "NODE_AGENT_NODE_NAME": "n2"}
    assert parse_run("--secret", "ns/creds", env=env).node_name == "n2"
    # Without Events and restart slots, no node name is needed.
    alone = ("--restart-concurrency", "0")
    assert parse_run("--secret", "ns/creds", "--no-events", *alone).events is False
    assert parse_run("--secret", "ns/creds", "--events", "false", *alone).events is False
    file_only = parse_run("--secret-file", str(tmp_path / "s.json"), *alone)
    assert file_only.events is False
    with_env = parse_run("--secret", "ns/c", *alone, env={"NODE_AGENT_EVENTS": "false"})
    assert with_env.events is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "at least one source"),
        (("--secret", "no-namespace"), "NAMESPACE/NAME"),
        (("--secret-file", "s.json", "--metrics-address", "9464"), "HOST:PORT"),
        (("--secret-file", "s.json", "--on-secret-delete", "forget"), "invalid choice"),
        (("--secret-file", "s.json", "--reload", "command"), "--reload-command"),
        (("--secret-file", "s.json", "--resync-interval", "0s"), "--resync-interval"),
    ],
)
def test_unusable_run_flags_exit_2(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *args], environ={}) == 2
    assert message in capsys.readouterr().err


def test_restart_coordination_flags_and_defaults() -> None:
    settings = parse_run("--secret", "ns/creds", "--node-name", "n1")
    assert settings.coordinates_restarts
    assert settings.restarts == RestartCoordination(
        concurrency=1, lease_ttl=60.0, max_wait=1800.0, settle=5.0, lease_namespace="node-agent"
    )
    tuned = parse_run(
        "--secret=ns/creds",
        "--node-name=n1",
        "--restart-concurrency=5",
        "--restart-lease-ttl=2m",
        "--restart-max-wait=1h",
        "--restart-settle=0s",
        "--restart-lease-namespace=ops",
    )
    assert tuned.restarts == RestartCoordination(
        concurrency=5, lease_ttl=120.0, max_wait=3600.0, settle=0.0, lease_namespace="ops"
    )
    from_env = parse_run(
        "--secret=ns/creds", env={"NODE_NAME": "n1", "NODE_AGENT_RESTART_CONCURRENCY": "3"}
    )
    assert from_env.restarts.concurrency == 3


@pytest.mark.parametrize(
    ("args", "coordinates"),
    [
        ((), True),
        (("--restart-concurrency", "0"), False),
        (("--reload", "none"), False),
        (("--targets", "kubelet"), False),
        (("--dry-run",), False),
        (("--once",), False),
    ],
)
def test_restarts_are_coordinated_only_when_the_daemon_restarts_containerd(
    args: tuple[str, ...], coordinates: bool
) -> None:
    settings = parse_run("--secret", "ns/creds", "--node-name", "n1", *args)
    assert settings.coordinates_restarts is coordinates
    assert settings.uses_api


def test_restart_slots_need_a_node_name_and_a_lease_namespace(tmp_path: Path) -> None:
    secret_file = str(tmp_path / "s.json")
    with pytest.raises(ValueError, match="restart slots need this node's name"):
        parse_run("--secret-file", secret_file)
    with pytest.raises(ValueError, match="--restart-lease-namespace"):
        daemon_settings_from(
            build_parser({"NODE_NAME": "n1"}).parse_args(["run", "--secret-file", secret_file])
        )
    uncoordinated = parse_run("--secret-file", secret_file, "--restart-concurrency", "0")
    assert not uncoordinated.uses_api


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--restart-lease-ttl", "20s"), "--restart-lease-ttl (20s) must be at least"),
        (("--reload-timeout", "60s"), "--reload-timeout (60s) + 5s"),
        (("--restart-concurrency", "-1"), "--restart-concurrency takes a whole number"),
        (("--restart-concurrency", "two"), "--restart-concurrency takes a whole number"),
        (("--restart-max-wait", "0s"), "--restart-max-wait must be more than 0s"),
        (("--restart-lease-namespace", "Not_A_Namespace"), "--restart-lease-namespace"),
    ],
)
def test_unusable_restart_flags_exit_2(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["run", "--secret", "ns/creds", *args],
        environ={"NODE_NAME": "n1", "POD_NAMESPACE": "x"},
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_run_reads_secret_refs_from_the_environment() -> None:
    settings = parse_run(env={"NODE_AGENT_SECRET": "a/one,b/two", "NODE_NAME": "n"})
    assert settings.secrets == (ObjectRef("a", "one"), ObjectRef("b", "two"))


# --- a bug in a pass ----------------------------------------------------------------------


class BuggyKubeletFormat(KubeletFormat):
    """kubelet's format with a bug in render (what a library release can bring)."""

    def render(self, text: str | None, updates: Mapping[str, Entry | None]) -> str:
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")


def test_a_bug_in_a_pass_counts_as_an_error_turns_readiness_off_and_raises_an_event(
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "secret.json"
    secret_file.write_bytes(auths(reg_example="pw"))
    config_json = tmp_path / "config.json"
    files = (NodeFile(BuggyKubeletFormat(), config_json),)
    store = StateStore(tmp_path / "state")
    sources = CredentialSources(files=[secret_file])
    health = Health()
    metrics = AgentMetrics(CollectorRegistry(), process=False)
    events = RecordedEvents()
    readiness = Readiness(health, sources)
    reporter = DaemonReporter(metrics=metrics, events=events, readiness=readiness)
    worker = Worker(
        queue=WorkQueue(debounce=0.0),
        sources=sources,
        reconciler=Reconciler(files, store),
        reporter=reporter,
        readiness=readiness,
        health=health,
    )
    readiness.pass_succeeded()  # ready before, as after an earlier good pass
    report = worker.handle(Batch(frozenset({START})))
    assert report is not None and report.result == "error"
    assert report.error is not None
    assert report.error.startswith(
        f"unexpected UnicodeEncodeError while editing the kubelet file {config_json}"
    )
    assert "\ud800" not in report.error
    assert metrics.registry.get_sample_value("node_agent_reconcile_total", {"result": "error"}) == 1
    ready, reason = health.readiness()
    assert not ready and "UnicodeEncodeError" in reason
    assert [(kind, reason) for kind, reason, _ in events.recorded] == [
        ("Warning", "RegistryCredentialsReconcileFailed")
    ]
    assert not config_json.exists()


def test_the_daemon_never_waits_on_a_fifo_where_a_node_file_should_be(tmp_path: Path) -> None:
    """Found by: daemon I/O faults. The worker's fingerprint of a node file opened a FIFO for
    a blocking read: the worker hung until someone wrote to the FIFO, and removing the FIFO
    did not wake it."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    answers: list[object] = []
    reader = threading.Thread(target=lambda: answers.append(read_fingerprint(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=2)
    if reader.is_alive():  # the bug: release the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_fingerprint waited for a writer on a FIFO")
    (answer,) = answers
    assert isinstance(answer, str) and "not a regular file" in answer


# --- the failed-pass Event -----------------------------------------------------------------


def reporter(events: RecordedEvents) -> DaemonReporter:
    readiness = Readiness(Health(), CredentialSources(files=()))
    return DaemonReporter(metrics=AgentMetrics(), events=events, readiness=readiness)


def test_a_failed_pass_is_a_warning_event_with_the_one_line_error_the_same_for_each_retry() -> None:
    events = RecordedEvents()
    error = "/etc/containerd/config.toml: cannot write: No space left on device"
    for _ in range(3):
        reporter(events).pass_done(PassReport(result="error", error=error))
    expected = ("Warning", RECONCILE_FAILED, f"reconcile failed: {error}; retrying with backoff")
    # Identical occurrences: the recorder turns them into one Event with count 3.
    assert events.recorded == [expected] * 3


def test_a_rolled_back_restart_is_reported_once_not_also_as_a_failed_pass() -> None:
    events = RecordedEvents()
    reporter(events).pass_done(
        PassReport(result="error", restart="rolled_back", error="restart failed; restored")
    )
    assert [reason for _, reason, _ in events.recorded] == [ROLLED_BACK]


def test_a_multi_line_error_becomes_one_line_in_the_event() -> None:
    events = RecordedEvents()
    reporter(events).pass_done(PassReport(result="error", error="first line\nsecond line"))
    (_, _, message), *_ = events.recorded
    assert "\n" not in message and "first line second line" in message
