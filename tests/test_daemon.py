"""`node-agent run` in-process: the real `kubernetes` client against the test API server
(tests/kubeapi.py), real node files in tmp_path, real watchdog, a real restart command and a
fake CRI for the health check. Metrics are read from the daemon's registry, Events from
the test API server.

Intervals are short (debounce 50 ms, min reload interval 1 s) so the file runs in seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubeapi import KubeApiServer
from support.agent import StartAgent
from support.dockerconfig import DOCKERCONFIG, basic_auth, docker_config, login, registry_login
from support.node import MINIMAL_FOREIGN_JSON as FOREIGN_JSON
from support.node import MINIMAL_FOREIGN_TOML as FOREIGN_TOML
from support.node import REGISTRY, NodeTree
from support.settings import (
    NAME,
    NS,
    SECRET,
    create_secret,
    update_secret,
)
from support.waiting import wait_until

from node_agent.daemon.run import build_daemon
from node_agent.daemon.work_queue import Batch
from node_agent.daemon.worker import RESYNC, START
from node_agent.kube.model import ObjectRef
from node_agent.settings import DaemonSettings, RestartCoordination, Settings

# --- following the Secret -----------------------------------------------------------------


def test_secret_create_update_delete_are_followed_and_foreign_entries_stay(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    agent = start_agent()
    wait_until(lambda: agent.get("/readyz")[0] == 200, what="ready with no Secret yet")
    assert node.passwords() == (None, None)

    create_secret(kube_api, "Pa55-first")
    agent.wait_for_passwords("Pa55-first")
    update_secret(kube_api, "Pa55-second")
    agent.wait_for_passwords("Pa55-second")
    kube_api.delete_secret(NS, NAME)
    agent.wait_for_passwords(None)

    assert node.containerd_password("foreign.example") == "their-password"
    assert node.kubelet_password("quay.io") == "q"
    assert node.config_toml.read_text() == FOREIGN_TOML
    assert node.config_json.read_text() == FOREIGN_JSON
    wait_until(lambda: agent.events("RegistryCredentialsApplied"), what="Applied event")
    message = agent.events("RegistryCredentialsApplied")[0]["message"]
    assert REGISTRY in message and str(node.config_toml) in message
    assert "Pa55" not in json.dumps(kube_api.events())
    assert agent.metric("node_agent_drift_repairs_total", target="containerd") == 0


def test_with_on_secret_delete_keep_a_deleted_secret_leaves_the_files_alone(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "kept")
    agent = start_agent(on_secret_delete="keep")
    agent.wait_for_passwords("kept")
    kube_api.delete_secret(NS, NAME)
    time.sleep(0.4)
    assert node.passwords() == ("kept", "kept")
    assert agent.get("/readyz")[0] == 200


def test_startup_makes_one_list_and_one_watch_per_source(
    kube_api: KubeApiServer, start_agent: StartAgent
) -> None:
    create_secret(kube_api, "pw")
    kube_api.create_secret(
        NS, "second", registry_login("other.example", "other"), type=DOCKERCONFIG
    )
    agent = start_agent(secrets=(SECRET, ObjectRef(NS, "second")))
    agent.wait_for_passwords("pw")
    time.sleep(0.3)  # several bookmarks later
    verbs = sorted(r.verb for r in kube_api.requests(plural="secrets"))
    assert verbs == ["list", "list", "watch", "watch"]


def test_an_api_outage_removes_nothing_and_the_agent_catches_up_after_it(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "before")
    agent = start_agent()
    agent.wait_for_passwords("before")
    with kube_api.outage():
        update_secret(kube_api, "during")  # straight into the store: nobody can see it yet
        wait_until(
            lambda: (
                agent.metric(
                    "node_agent_source_errors_total", source=str(SECRET), reason="unreachable"
                )
                >= 2
            ),
            what="failed attempts counted",
        )
        assert node.passwords() == ("before", "before")
        assert agent.get("/readyz")[0] == 200  # an outage is not the node's problem
    agent.wait_for_passwords("during")
    assert agent.metric("node_agent_watch_restarts_total", source=str(SECRET)) >= 1


def test_an_agent_started_during_an_outage_waits_and_removes_nothing(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "applied-earlier")
    first = start_agent()
    first.wait_for_passwords("applied-earlier")
    first.stop()
    with kube_api.outage():
        second = start_agent()
        time.sleep(0.5)
        assert node.passwords() == ("applied-earlier", "applied-earlier")
        status, reason = second.get("/readyz")
        assert status == 503 and "waiting for a first good read" in reason
    update_secret(kube_api, "after")
    second.wait_for_passwords("after")


def test_410_gone_relists_without_missing_an_update(
    kube_api: KubeApiServer, start_agent: StartAgent
) -> None:
    create_secret(kube_api, "one")
    agent = start_agent()
    agent.wait_for_passwords("one")
    kube_api.stall_watches()  # the open watch will not deliver what follows
    update_secret(kube_api, "two")
    kube_api.compact()  # and its resourceVersion is now too old
    kube_api.drop_watches()
    agent.wait_for_passwords("two")
    lists = [r for r in kube_api.requests(plural="secrets") if r.verb == "list"]
    assert len(lists) == 2


# --- drift ----------------------------------------------------------------------------------


def edit_in_place(path: Path) -> None:
    text = path.read_text()
    if path.suffix == ".toml":
        path.write_text(text.replace('password = "pw"', 'password = "edited"'))
    else:
        document = json.loads(text)
        document["auths"][REGISTRY]["auth"] = basic_auth("puller", "edited")
        path.write_text(json.dumps(document))


def replace_atomically(path: Path) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(FOREIGN_TOML if path.suffix == ".toml" else FOREIGN_JSON)
    temp.rename(path)


DRIFTS: dict[str, Callable[[Path], None]] = {
    "edit": edit_in_place,
    "delete": Path.unlink,
    "atomic replace": replace_atomically,
}


@pytest.mark.parametrize("target", ["containerd", "kubelet"])
@pytest.mark.parametrize("drift", list(DRIFTS))
def test_drift_is_repaired_within_a_second_and_counted(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree, target: str, drift: str
) -> None:
    create_secret(kube_api, "pw")
    agent = start_agent()
    agent.wait_for_passwords("pw")
    agent.wait_idle()
    path = node.config_toml if target == "containerd" else node.config_json

    DRIFTS[drift](path)
    took = agent.wait_for_passwords("pw", timeout=1.0)

    assert took < 1.0
    wait_until(lambda: agent.metric("node_agent_drift_repairs_total", target=target) == 1)
    other = "kubelet" if target == "containerd" else "containerd"
    assert agent.metric("node_agent_drift_repairs_total", target=other) == 0
    wait_until(lambda: agent.events("RegistryCredentialsDriftRepaired"), what="event")
    assert str(path) in agent.events("RegistryCredentialsDriftRepaired")[0]["message"]


def test_own_writes_are_neither_drift_nor_extra_passes(
    kube_api: KubeApiServer, start_agent: StartAgent
) -> None:
    create_secret(kube_api, "v0")
    agent = start_agent()
    agent.wait_for_passwords("v0")
    agent.wait_idle()
    before = agent.passes()
    for version in range(1, 4):
        update_secret(kube_api, f"v{version}")
        agent.wait_for_passwords(f"v{version}")
        agent.wait_idle(quiet=0.2)
    assert agent.passes() - before == 3  # one pass per update, none for its own echo
    for target in ("containerd", "kubelet"):
        assert agent.metric("node_agent_drift_repairs_total", target=target) == 0


def test_a_resync_finds_a_change_no_event_reported(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "pw")
    agent = start_agent()
    agent.wait_for_passwords("pw")
    agent.stop()  # no more file events, no more passes of its own
    node.config_json.write_text(FOREIGN_JSON)
    report = agent.daemon.worker.handle(Batch(frozenset({RESYNC})))
    assert report is not None and report.result == "applied"
    assert node.kubelet_password() == "pw"
    assert [w.drift for w in report.writes] == [True]
    unchanged = agent.daemon.worker.handle(Batch(frozenset({RESYNC})))
    assert unchanged is not None and unchanged.result == "noop"


# --- invalid Secret, metrics, health -------------------------------------------------------


def test_an_invalid_secret_keeps_the_last_good_credentials_and_turns_readiness_off(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "good")
    agent = start_agent()
    agent.wait_for_passwords("good")
    wait_until(lambda: agent.get("/readyz")[0] == 200)

    kube_api.update_secret(NS, NAME, {".dockerconfigjson": b'{"auths": {"r.example": 5}}'})
    wait_until(lambda: agent.get("/readyz")[0] == 503, what="not ready")
    reason = agent.get("/readyz")[1]
    assert str(SECRET) in reason and "expected an object" in reason
    invalid = agent.metric("node_agent_source_errors_total", source=str(SECRET), reason="invalid")
    assert invalid == 1
    wait_until(lambda: agent.events("RegistryCredentialsInvalid"), what="Invalid event")
    assert agent.events("RegistryCredentialsInvalid")[0]["type"] == "Warning"
    assert node.passwords() == ("good", "good")

    update_secret(kube_api, "fixed")
    agent.wait_for_passwords("fixed")
    wait_until(lambda: agent.get("/readyz")[0] == 200, what="ready again")


# --- hostile input ---------------------------------------------------------------------------

HIDDEN = "Sup3rS3cretPW"
HOSTILE_SECRETS = {
    "a password inside a registry key": {
        f"https://puller:{HIDDEN}@reg.example.com/v2/\nnode-agent: forged line": {"auth": "dTpw"}
    },
    "a lone surrogate": {"reg.example": {"username": "u", "password": f"{HIDDEN}\ud800"}},
}


@pytest.mark.parametrize("auths", HOSTILE_SECRETS.values(), ids=HOSTILE_SECRETS.keys())
def test_a_hostile_secret_is_invalid_everywhere_and_shown_nowhere(
    kube_api: KubeApiServer,
    start_agent: StartAgent,
    node: NodeTree,
    auths: dict[str, object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    create_secret(kube_api, "good")
    agent = start_agent()
    agent.wait_for_passwords("good")
    document = json.dumps({"auths": auths}).encode()  # ensure_ascii: a surrogate is valid JSON
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": document})
    wait_until(lambda: agent.get("/readyz")[0] == 503, what="not ready")
    wait_until(lambda: agent.events("RegistryCredentialsInvalid"), what="Invalid event")
    reason = agent.get("/readyz")[1]
    invalid = agent.metric("node_agent_source_errors_total", source=str(SECRET), reason="invalid")
    assert invalid == 1
    assert node.passwords() == ("good", "good")
    shown = [reason, json.dumps(kube_api.events()), caplog.text]
    assert not any(HIDDEN in text for text in shown)
    assert reason.count("\n") == 1  # the body's own final newline
    assert all("\nnode-agent: forged" not in text for text in shown)


def test_a_secret_emptied_removes_the_entries_with_a_warning_event(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "good")
    agent = start_agent()
    agent.wait_for_passwords("good")
    kube_api.update_secret(NS, NAME, {".dockerconfigjson": b'{"auths": {}}'})
    agent.wait_for_passwords(None)
    wait_until(lambda: agent.events("RegistryCredentialsEmpty"), what="the Empty event")
    (event,) = agent.events("RegistryCredentialsEmpty")
    assert event["type"] == "Warning"
    assert "2 entries the agent manages are removed" in event["message"]


METRIC_NAMES = {
    "node_agent_build_info",
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


def test_metrics_and_health_after_the_first_pass(
    kube_api: KubeApiServer, start_agent: StartAgent
) -> None:
    create_secret(kube_api, "pw")
    agent = start_agent()
    agent.wait_for_passwords("pw")
    wait_until(lambda: agent.metric("node_agent_reconcile_total", result="applied") == 1)

    assert {name for name, _ in agent.scrape()} >= METRIC_NAMES
    for target in ("containerd", "kubelet"):
        assert agent.metric("node_agent_in_sync", target=target) == 1
        assert agent.metric("node_agent_managed_registries", target=target) == 1
    last_success = agent.metric("node_agent_last_success_timestamp_seconds")
    assert time.time() - 10 < last_success <= time.time()
    assert agent.metric("node_agent_reconcile_duration_seconds_count") >= 1
    assert agent.get("/healthz") == (200, "ok\n")
    assert agent.get("/readyz") == (200, "ok\n")
    _, text = agent.get("/metrics")
    assert "pw" not in text.replace("password", "")


# --- file sources -------------------------------------------------------------------------


@dataclass
class SecretVolume:
    """A directory laid out like kubelet's Secret volume: keys link through `..data`."""

    path: Path
    generation: int = field(default=0)

    def publish(self, password: str) -> None:
        self.generation += 1
        version = self.path / f"..2026_{self.generation:04d}"
        version.mkdir(parents=True)
        (version / ".dockerconfigjson").write_bytes(docker_config({REGISTRY: login(password)}))
        link = self.path / "..data_tmp"
        link.symlink_to(version.name)
        link.rename(self.path / "..data")  # the atomic swap kubelet does
        key = self.path / ".dockerconfigjson"
        if not key.is_symlink():
            key.symlink_to("..data/.dockerconfigjson")


def test_a_secret_volume_is_followed_through_its_data_swaps(
    start_agent: StartAgent, tmp_path: Path
) -> None:
    volume = SecretVolume(tmp_path / "volume")
    volume.publish("mounted-1")
    agent = start_agent(secrets=(), secret_files=(volume.path,))
    agent.wait_for_passwords("mounted-1")
    volume.publish("mounted-2")
    agent.wait_for_passwords("mounted-2", timeout=1.0)


def test_api_sources_outrank_file_sources(
    kube_api: KubeApiServer, start_agent: StartAgent, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret.json"
    secret_file.write_bytes(docker_config({REGISTRY: login("from-file")}))
    create_secret(kube_api, "from-api")
    agent = start_agent(secret_files=(secret_file,))
    agent.wait_for_passwords("from-api")
    kube_api.delete_secret(NS, NAME)
    agent.wait_for_passwords("from-file")


def test_stopping_leaves_no_temp_files_and_ends_every_thread(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "pw")
    agent = start_agent(restart=True)
    agent.wait_for_passwords("pw")
    update_secret(kube_api, "pw-2")
    started = time.monotonic()
    agent.stop()
    assert time.monotonic() - started < 4
    assert node.temp_files() == []
    assert kube_api.open_watches() == 0


def test_a_forbidden_secret_is_counted_and_removes_nothing(
    kube_api: KubeApiServer, start_agent: StartAgent, node: NodeTree
) -> None:
    create_secret(kube_api, "pw")
    first = start_agent()
    first.wait_for_passwords("pw")
    first.stop()
    kube_api.fail_next(403, times=None, verb="list")  # RBAC broken, e.g. after a redeploy
    agent = start_agent()
    wait_until(
        lambda: (
            agent.metric("node_agent_source_errors_total", source=str(SECRET), reason="forbidden")
            >= 2
        ),
        what="forbidden counted",
    )
    assert node.passwords() == ("pw", "pw")
    kube_api.clear_faults()
    update_secret(kube_api, "pw-2")
    agent.wait_for_passwords("pw-2")


def test_dry_run_reports_differences_and_writes_nothing(node: NodeTree, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret.json"
    secret_file.write_bytes(docker_config({REGISTRY: login("pw")}))
    before = (node.config_toml.read_bytes(), node.config_json.read_bytes())
    settings = DaemonSettings(
        node=Settings(
            secret_files=(secret_file,),
            containerd_config=node.config_toml,
            kubelet_config=node.config_json,
            state_dir=node.state_dir,
            restart_mode="none",
            dry_run=True,
        ),
        metrics_address="127.0.0.1:0",
    )
    report = build_daemon(settings).worker.handle(Batch(frozenset({START})))
    assert report is not None
    assert (report.result, dict(report.in_sync)) == (
        "noop",
        {"containerd": False, "kubelet": False},
    )
    assert (node.config_toml.read_bytes(), node.config_json.read_bytes()) == before
    assert not node.state_dir.exists()


def test_a_symlink_loop_where_a_node_file_should_be_fails_the_pass_cleanly(
    tmp_path: Path,
) -> None:
    """Found by: daemon I/O faults. After the pass failed ("symlink loop"), the worker's
    bookkeeping called `Path.resolve`, which raises RuntimeError on a loop (Python 3.11): no
    error counted, no Event, no retry, a traceback for every file event."""
    secret = tmp_path / "secret.json"
    secret.write_bytes(docker_config({"reg.example": {"auth": "dTpw"}}))
    config_json = tmp_path / "config.json"
    config_json.symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(config_json)
    settings = DaemonSettings(
        node=Settings(
            secret_files=(secret,),
            containerd_config=tmp_path / "config.toml",
            kubelet_config=config_json,
            state_dir=tmp_path / "state",
            restart_mode="none",
        ),
        metrics_address="127.0.0.1:0",
        restarts=RestartCoordination(concurrency=0),
    )
    report = build_daemon(settings).worker.handle(Batch(frozenset({START})))
    assert report is not None and report.result == "error"
    assert report.error is not None and "symlink loop" in report.error
