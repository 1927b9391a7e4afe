"""API faults against the daemon (RELIABILITY.md): `node-agent run` in this process,
the real `kubernetes` client against the test API server (tests/kubeapi.py), while the API
is down for five minutes, flaps every second, answers 410 Gone again and again, or serves a
Secret that flips between valid and invalid content.

Invariants, checked on every version of both node files (`NodeMonitor` reads each one as it
appears, and again after every step), not only at the end:

- credentials are never removed except on a confirmed delete, never replaced by anything but
  a newer valid version of the Secret, and nothing the agent does not own changes;
- the node ends in sync with the last valid Secret: both files hold it and
  `node_agent_in_sync` is 1 for both targets.

Time: the five-minute outage runs on compressed time (`TimeScale`): every timing of the
daemon (watch backoff 1 s…60 s, resync 5 min, pass retries, debounce, restart interval) is
divided by the same factor as the outage, 100 in the reduced run (3 s) and 10 in the full one
(30 s), so the agent makes the same number of attempts as in five real minutes. The flapping
is real time (the API goes away and comes back every second) with the daemon's timings
compressed 100x, so it reconnects in most up-phases and is cut off mid-list and mid-watch.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from campaign import (
    NodeMonitor,
    SecretVersions,
    Tally,
    agent_passwords,
    campaign,
    campaign_seed,
    campaign_size,
    is_full_scale,
)
from kubeapi import KubeApiServer
from leak_audit import CANARY_USERNAME, LeakAudit
from support.agent import Agent, running_in_process
from support.dockerconfig import DOCKERCONFIG, document_data, login, registry_login
from support.node import REGISTRY, NodeTree
from support.settings import NAME, NS, TimeScale, scaled_settings
from support.waiting import wait_until

CAMPAIGN = "daemon: API faults"
COMMAND = "NODE_AGENT_CAMPAIGN_SCALE=full pytest tests/test_campaign_daemon_api_faults.py"
FAST = TimeScale(100)
"""Production timings compressed 100x: watch backoff 10 ms…0.6 s, resync 3 s."""

UNREACHABLE = {"source": "kube-system/registry-credentials", "reason": "unreachable"}

pytestmark = pytest.mark.usefixtures("leak_audit")


@pytest.fixture
def node(tmp_path: Path, leak_audit: LeakAudit, caplog: pytest.LogCaptureFixture) -> NodeTree:
    """Foreign config files; the agent's debug log goes through the leak audit."""
    caplog.set_level(logging.DEBUG, logger="node_agent")
    node = NodeTree.create(tmp_path / "node")
    leak_audit.guard_node(files=node.targets, state_dir=node.state_dir)
    return node


def holds(node: NodeTree, password: str) -> Callable[[], bool]:
    return lambda: agent_passwords(node) == (password, password)


def settle_on(agent: Agent, node: NodeTree, versions: SecretVersions, *, timeout: float) -> float:
    """Wait until both files hold the last valid version and the metrics say in sync."""
    return wait_until(
        lambda: holds(node, versions.last)() and agent.in_sync(),
        timeout=timeout,
        what=lambda: f"in sync with {versions.last}, files hold {agent_passwords(node)}",
    )


def finish(tally: Tally, monitor: NodeMonitor) -> None:
    monitor.check_now()
    tally.data_lost += monitor.data_lost
    tally.failures += len(monitor.violations)
    tally.outcomes["node file versions checked"] += monitor.versions_checked
    monitor.assert_clean()


# --- a five-minute outage -------------------------------------------------------------------


def test_a_five_minute_outage_removes_nothing_and_the_node_catches_up_after_it(
    node: NodeTree, kube_api: KubeApiServer, record_property: Any
) -> None:
    scale = TimeScale(10 if is_full_scale() else 100)
    versions = SecretVersions(kube_api)
    versions.publish()
    settings = scaled_settings(node, kube_api, scale=scale)
    with (
        campaign(record_property, CAMPAIGN, command=COMMAND) as tally,
        NodeMonitor(node, versions) as monitor,
        ExitStack() as daemons,
    ):
        first = daemons.enter_context(running_in_process(settings, node, kube_api, scale.timings()))
        settle_on(first, node, versions, timeout=10)
        monitor.removal_allowed = False
        before = node.contents()
        refused_before = kube_api.refused_connections
        kube_api.set_outage(True)
        try:
            # Ten changes during the outage, one every 30 s: nobody can see them.
            for _ in range(5):
                time.sleep(scale(30))
                versions.publish()
                monitor.check_now()
                tally.cases += 1
            # Half-way, the agent restarts (a new pod) and must wait: it has read nothing yet.
            first.stop()
            second = daemons.enter_context(
                running_in_process(settings, node, kube_api, scale.timings())
            )
            for _ in range(5):
                time.sleep(scale(30))
                versions.publish()
                monitor.check_now()
                tally.cases += 1
            ready, reason = second.daemon.parts.health.readiness()
            assert not ready and "waiting for a first good read" in reason
            assert second.passes("applied") + second.passes("noop") == 0
            assert node.contents() == before
            assert second.metric("node_agent_source_errors_total", **UNREACHABLE) >= 1
            attempts = kube_api.refused_connections - refused_before
        finally:
            kube_api.set_outage(False)
        outage_over = time.monotonic()
        # Backoff 1 s…60 s with full jitter, two agents: ~25 attempts in 5 min.
        assert attempts <= 60, f"{attempts} connection attempts in a 5-minute outage"
        tally.outcomes["connection attempts during the outage"] += attempts
        # At most one backoff delay (60 s, simulated) after the API is back.
        settle_on(second, node, versions, timeout=scale(60) + 5)
        tally.notes.append(
            f"outage: caught up {scale.factor * (time.monotonic() - outage_over):.0f} s "
            f"(simulated) after the API came back"
        )
        second.stop()
        finish(tally, monitor)


# --- flapping -------------------------------------------------------------------------------


def test_an_api_flapping_every_second_removes_nothing_and_the_node_ends_in_sync(
    node: NodeTree, kube_api: KubeApiServer, record_property: Any
) -> None:
    flips = campaign_size(quick=6, full=60)
    rng = random.Random(campaign_seed())
    versions = SecretVersions(kube_api)
    versions.publish()
    with (
        campaign(record_property, CAMPAIGN, command=COMMAND) as tally,
        NodeMonitor(node, versions) as monitor,
        running_in_process(
            scaled_settings(node, kube_api, scale=FAST), node, kube_api, FAST.timings()
        ) as agent,
    ):
        settle_on(agent, node, versions, timeout=10)
        monitor.removal_allowed = False
        caught_up_while_up = 0
        for flip in range(flips):
            down = flip % 2 == 0
            kube_api.set_outage(down)
            # The Secret changes at a random moment of the phase, down or up.
            time.sleep(rng.uniform(0, 0.5))
            versions.publish()
            time.sleep(0.5)
            monitor.check_now()
            tally.cases += 1
            caught_up_while_up += not down and holds(node, versions.last)()
        kube_api.set_outage(False)
        settle_on(agent, node, versions, timeout=FAST(60) + 5)
        tally.outcomes["flaps"] += flips
        tally.notes.append(
            f"flapping: caught up within {caught_up_while_up} of {flips // 2} up-phases"
        )
        agent.stop()
        finish(tally, monitor)


# --- 410 storms -----------------------------------------------------------------------------


def storm_step(kube_api: KubeApiServer, versions: SecretVersions, rng: random.Random) -> str:
    """One burst of lost history while the Secret changes; the kind of burst. Each starts by
    stalling the open watch, so the agent's resourceVersion falls behind and only 410 Gone and
    a relist can tell it what happened."""
    kinds = ["changed", "burst", "410 on watch", "metadata only", "compact during relist"]
    kind = rng.choice(kinds)
    kube_api.stall_watches()
    if kind == "changed":
        versions.publish()
        kube_api.compact()
    elif kind == "burst":  # several changes, history lost between each
        for _ in range(rng.randint(2, 4)):
            versions.publish()
            kube_api.compact()
    elif kind == "410 on watch":  # the next watches answer 410 whatever their version
        kube_api.fail_next(410, times=rng.randint(1, 3), verb="watch")
        versions.publish()
    elif kind == "metadata only":  # a new resourceVersion, the same data: nothing to do
        kube_api.touch_secret(NS, NAME)
        kube_api.compact()
    else:  # history lost again right after the relist
        versions.publish()
        kube_api.compact()
        kube_api.drop_watches()
        time.sleep(0.01)
        kube_api.stall_watches()
        versions.publish()
        kube_api.compact()
    kube_api.drop_watches()
    return kind


def test_410_storms_while_the_secret_changes_miss_nothing_and_remove_nothing(
    node: NodeTree, kube_api: KubeApiServer, record_property: Any
) -> None:
    steps = campaign_size(quick=30, full=400)
    rng = random.Random(campaign_seed())
    versions = SecretVersions(kube_api)
    versions.publish()
    with (
        campaign(record_property, CAMPAIGN, command=COMMAND) as tally,
        NodeMonitor(node, versions) as monitor,
        running_in_process(
            scaled_settings(node, kube_api, scale=FAST), node, kube_api, FAST.timings()
        ) as agent,
    ):
        settle_on(agent, node, versions, timeout=10)
        monitor.removal_allowed = False
        kube_api.clear_requests()
        for _ in range(steps):
            tally.outcomes[f"410 storm: {storm_step(kube_api, versions, rng)}"] += 1
            if rng.random() < 0.5:  # sometimes the next burst comes before the agent caught up
                settle_on(agent, node, versions, timeout=FAST(60) + 5)
            monitor.check_now()
            tally.cases += 1
        kube_api.clear_faults()
        settle_on(agent, node, versions, timeout=FAST(60) + 5)
        lists = len(kube_api.requests(verb="list", plural="secrets"))
        watches = len(kube_api.requests(verb="watch", plural="secrets"))
        assert lists > steps / 4, "the storms did not make the agent relist"
        # A relist and a watch or two per burst, a few retries: far from a hot loop.
        assert lists + watches <= 20 * steps, f"{lists} lists, {watches} watches"
        tally.notes.append(f"410 storms: {lists} relists, {watches} watches for {steps} bursts")

        # The one removal there is: a confirmed delete.
        monitor.removal_allowed = True
        versions.delete()
        wait_until(
            lambda: agent_passwords(node) == (None, None) and agent.in_sync(),
            timeout=5,
            what="credentials removed after the confirmed delete",
        )
        agent.stop()
        finish(tally, monitor)


# --- a Secret flipping between valid and invalid --------------------------------------------


def _entry(password: str) -> dict[str, str]:
    return login(password, username=CANARY_USERNAME)


#: Secret contents the agent must refuse, keeping the last valid version. Some name a
#: registry of their own: if any of it reached a node file, the monitor would see it.
INVALID_SECRETS: dict[str, tuple[Mapping[str, bytes], str]] = {
    "not JSON": ({".dockerconfigjson": b'{"auths": {'}, DOCKERCONFIG),
    "no auths": (document_data({"credsStore": "x"}), DOCKERCONFIG),
    "auths not an object": (document_data({"auths": []}), DOCKERCONFIG),
    "entry not an object": (
        document_data({"auths": {"flip.example": 5}}),
        DOCKERCONFIG,
    ),
    "auth not base64": (
        document_data({"auths": {REGISTRY: {"auth": "not base64!"}}}),
        DOCKERCONFIG,
    ),
    "two passwords for one registry": (
        document_data(
            {
                "auths": {
                    REGISTRY: _entry("first-of-two"),
                    f"https://{REGISTRY}/v2/": _entry("second-of-two"),
                }
            }
        ),
        DOCKERCONFIG,
    ),
    "newline in a registry": (
        document_data({"auths": {"flip.example\n/v2": _entry("newline")}}),
        DOCKERCONFIG,
    ),
    "wrong key": ({"config.json": b'{"auths": {}}'}, DOCKERCONFIG),
    "no data": ({}, DOCKERCONFIG),
    # An Opaque Secret is read only for a .dockerconfigjson key; under another key it is
    # still a Secret of the wrong type.
    "Opaque": (
        {"config.json": registry_login("flip.example", "p", username="u")[".dockerconfigjson"]},
        "Opaque",
    ),
}


def test_a_secret_flipping_between_valid_and_invalid_keeps_the_last_valid_version(
    node: NodeTree, kube_api: KubeApiServer, record_property: Any
) -> None:
    steps = campaign_size(quick=30, full=400)
    rng = random.Random(campaign_seed())
    versions = SecretVersions(kube_api)
    versions.publish()
    scale = TimeScale(1000)  # a resync every 0.3 s: one comes during most invalid phases
    with (
        campaign(record_property, CAMPAIGN, command=COMMAND) as tally,
        NodeMonitor(node, versions) as monitor,
        running_in_process(
            scaled_settings(node, kube_api, scale=scale), node, kube_api, scale.timings()
        ) as agent,
    ):
        settle_on(agent, node, versions, timeout=10)
        monitor.removal_allowed = False
        health = agent.daemon.parts.health
        for _ in range(steps):
            if rng.random() < 0.5:
                versions.publish()
                settle_on(agent, node, versions, timeout=5)
                wait_until(lambda: health.readiness()[0], timeout=5, what="ready again")
                tally.outcomes["flip: valid"] += 1
            else:
                name = rng.choice(list(INVALID_SECRETS))
                data, secret_type = INVALID_SECRETS[name]
                versions.publish_invalid(data, type=secret_type)
                wait_until(
                    lambda: "registry-credentials" in health.readiness()[1],
                    timeout=5,
                    what=f"not ready on the invalid Secret ({name})",
                )
                if rng.random() < 0.5:  # a full pass while invalid (a resync) keeps it too
                    agent.wait_for_a_pass(timeout=5)
                assert holds(node, versions.last)()
                tally.outcomes[f"flip: invalid, {name}"] += 1
            monitor.check_now()
            tally.cases += 1
        versions.publish()
        settle_on(agent, node, versions, timeout=5)
        wait_until(lambda: agent.events("RegistryCredentialsInvalid"), timeout=5, what="Event")
        assert all(e["type"] == "Warning" for e in agent.events("RegistryCredentialsInvalid"))
        assert (
            agent.metric(
                "node_agent_source_errors_total",
                source="kube-system/registry-credentials",
                reason="invalid",
            )
            >= 1
        )
        agent.stop()
        finish(tally, monitor)
