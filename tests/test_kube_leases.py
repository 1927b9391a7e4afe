"""Leases through the real `kubernetes` client and the test API server, and the server's
restart-slot audit.

The first part specifies `KubeApi`'s `LeaseApi` calls: optimistic concurrency (create races,
resourceVersion-carrying updates), list and watch, and the agent's own errors. The second part
specifies the audit that every test using `kube_api` runs under: what it records, and what it
lets pass. Audit time comes from a fake clock installed on the server, so no test sleeps for a
lease duration.
"""

from __future__ import annotations

import copy
import json
import urllib.request
from collections.abc import Mapping
from typing import Any

import pytest
from kubeapi import LEASES, TOKEN, KubeApiServer, SlotChange
from support.clock import ManualClock

from node_agent.kube.client import KubeApi
from node_agent.kube.errors import (
    ApiConflict,
    ApiForbidden,
    ApiUnavailable,
    ObjectMissing,
    WatchExpired,
)
from node_agent.kube.model import LeaseApi, ObjectRef, WatchEvent

NS = "node-agent"
SLOT_0 = "node-agent-restart-0"
SLOT_1 = "node-agent-restart-1"
SLOT_2 = "node-agent-restart-2"
TTL = 30
# A MicroTime whose microseconds are 0: the client's own serialisation would drop them.
RENEWED = "2026-11-02T08:30:00.000000Z"
LATER = "2026-11-02T08:30:10.000000Z"
TIMEOUT = (1.0, 2.0)
PERMISSION = f"get, list, watch, create and update leases in namespace {NS}"


@pytest.fixture
def clock(kube_api: KubeApiServer) -> ManualClock:
    """The server's monotonic clock, moved by hand."""
    fake = ManualClock()
    kube_api.slot_audit.clock = fake
    return fake


def lease(name: str, holder: str | None, *, ttl: int = TTL, renewed: str = RENEWED) -> Any:
    """A Lease body as the coordinator would send it."""
    spec: dict[str, Any] = {
        "leaseDurationSeconds": ttl,
        "acquireTime": renewed,
        "renewTime": renewed,
    }
    if holder is not None:
        spec["holderIdentity"] = holder
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def with_holder(stored: dict[str, Any], holder: str | None, *, renewed: str = LATER) -> Any:
    """`stored` (carrying the resourceVersion it was read at) with a new holder and renewTime."""
    changed = copy.deepcopy(stored)
    changed["spec"]["renewTime"] = renewed
    if holder is None:
        changed["spec"].pop("holderIdentity", None)
    else:
        changed["spec"]["holderIdentity"] = holder
    return changed


def version(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["resourceVersion"])


def kinds(kube_api: KubeApiServer) -> list[tuple[str, str, str, str]]:
    return [(c.name, c.old_holder, c.new_holder, c.kind) for c in kube_api.slot_timeline(NS)]


def take_violations(kube_api: KubeApiServer) -> list[str]:
    """The violations a test provoked on purpose; cleared, so the fixture passes."""
    found = kube_api.violations()
    kube_api.clear_violations()
    return found


def test_kube_api_is_a_lease_api(agent_api: KubeApi) -> None:
    api: LeaseApi = agent_api  # mypy checks KubeApi against the protocol here
    assert api is agent_api


# --- create and replace -----------------------------------------------------------------------


def test_create_answers_the_stored_lease(kube_api: KubeApiServer, agent_api: KubeApi) -> None:
    created = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)

    assert created["spec"]["holderIdentity"] == "node-1"
    assert created["metadata"]["namespace"] == NS
    assert version(created) == version(kube_api.lease(NS, SLOT_0) or {})


def test_bodies_are_sent_exactly_as_given(kube_api: KubeApiServer, agent_api: KubeApi) -> None:
    """37.x would otherwise validate the dict into V1Lease: `.000000Z` would become
    `+00:00`, which the API server refuses for a MicroTime, and unknown fields would be
    refused before sending."""
    body = lease(SLOT_0, "node-1")
    body["spec"]["fieldFromANewerServer"] = "kept"

    created = agent_api.create_lease(NS, body, request_timeout=TIMEOUT)
    replaced = agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), with_holder(created, "node-1"), request_timeout=TIMEOUT
    )

    assert created["spec"] == body["spec"]
    assert replaced["spec"] == {**body["spec"], "renewTime": LATER}


def test_creating_an_existing_lease_is_a_conflict_that_already_exists(
    kube_api: KubeApiServer, agent_api: KubeApi
) -> None:
    agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)

    with pytest.raises(ApiConflict, match="create leases: the Lease already exists") as raised:
        agent_api.create_lease(NS, lease(SLOT_0, "node-2"), request_timeout=TIMEOUT)

    assert raised.value.already_exists
    assert raised.value.ref == f"{NS}/{SLOT_0}"
    assert (kube_api.lease(NS, SLOT_0) or {})["spec"]["holderIdentity"] == "node-1"


def test_replace_with_the_resource_version_just_read_succeeds(agent_api: KubeApi) -> None:
    created = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)

    renewed = agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), with_holder(created, "node-1"), request_timeout=TIMEOUT
    )

    assert int(version(renewed)) > int(version(created))
    assert renewed["spec"]["renewTime"] == LATER


def test_replace_with_a_stale_resource_version_is_a_conflict(
    kube_api: KubeApiServer, agent_api: KubeApi
) -> None:
    read_by_both = agent_api.create_lease(NS, lease(SLOT_0, None), request_timeout=TIMEOUT)
    agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), with_holder(read_by_both, "node-1"), request_timeout=TIMEOUT
    )

    with pytest.raises(ApiConflict, match="the Lease changed since it was read") as raised:
        agent_api.replace_lease(
            ObjectRef(NS, SLOT_0), with_holder(read_by_both, "node-2"), request_timeout=TIMEOUT
        )

    assert not raised.value.already_exists
    assert (kube_api.lease(NS, SLOT_0) or {})["spec"]["holderIdentity"] == "node-1"


def test_replace_of_a_deleted_lease_is_object_missing(
    kube_api: KubeApiServer, agent_api: KubeApi
) -> None:
    created = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    kube_api.delete_lease(NS, SLOT_0)

    with pytest.raises(ObjectMissing, match="update leases: the Lease no longer exists") as raised:
        agent_api.replace_lease(
            ObjectRef(NS, SLOT_0), with_holder(created, "node-1"), request_timeout=TIMEOUT
        )

    assert raised.value.ref == f"{NS}/{SLOT_0}"
    assert kube_api.lease(NS, SLOT_0) is None


def test_a_create_carrying_a_resource_version_fails_like_on_etcd(
    agent_api: KubeApi,
) -> None:
    """Re-creating a deleted slot from the object last read needs its resourceVersion removed."""
    created = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    again = with_holder(created, "node-1")
    again["metadata"]["name"] = SLOT_1

    with pytest.raises(ApiUnavailable, match="resourceVersion should not be set"):
        agent_api.create_lease(NS, again, request_timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [
        ("renewTime", "2026-11-02T08:30:00+00:00", 400),  # what `isoformat()` gives
        ("acquireTime", "2026-11-02T08:30:00Z", 400),
        ("leaseDurationSeconds", 30.0, 400),
        ("leaseDurationSeconds", 0, 422),
        ("leaseTransitions", -1, 422),
    ],
)
def test_a_lease_a_real_api_server_would_refuse_is_refused(
    kube_api: KubeApiServer, agent_api: KubeApi, field: str, value: object, status: int
) -> None:
    body = lease(SLOT_0, "node-1")
    body["spec"][field] = value

    with pytest.raises(ApiUnavailable, match=f"create leases: API answered {status}"):
        agent_api.create_lease(NS, body, request_timeout=TIMEOUT)

    assert kube_api.lease(NS, SLOT_0) is None


# --- list and watch -------------------------------------------------------------------------


def test_list_answers_the_namespaces_leases_and_a_resource_version(
    kube_api: KubeApiServer, agent_api: KubeApi
) -> None:
    empty = agent_api.list_leases(NS, request_timeout=TIMEOUT)
    for name, holder in ((SLOT_0, "node-1"), (SLOT_1, None)):
        agent_api.create_lease(NS, lease(name, holder), request_timeout=TIMEOUT)
    agent_api.create_lease("elsewhere", lease(SLOT_2, "node-9"), request_timeout=TIMEOUT)

    listed = agent_api.list_leases(NS, request_timeout=TIMEOUT)

    assert empty.items == [] and empty.resource_version
    assert [i["metadata"]["name"] for i in listed.items] == [SLOT_0, SLOT_1]
    assert int(listed.resource_version) >= max(int(version(i)) for i in listed.items)


def test_watch_follows_creation_update_and_deletion_with_bookmarks(
    kube_api: KubeApiServer, agent_api: KubeApi
) -> None:
    start = agent_api.list_leases(NS, request_timeout=TIMEOUT).resource_version
    stream = agent_api.watch_leases(
        NS, resource_version=start, timeout_seconds=5, request_timeout=TIMEOUT
    )
    created = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), with_holder(created, None), request_timeout=TIMEOUT
    )
    agent_api.create_lease("elsewhere", lease(SLOT_0, "node-9"), request_timeout=TIMEOUT)
    kube_api.delete_lease(NS, SLOT_0)

    events: list[WatchEvent] = []
    try:
        for event in stream:
            events.append(event)
            if event.type == "BOOKMARK" and any(e.type == "DELETED" for e in events):
                break
    finally:
        stream.close()

    changes = [e for e in events if e.type != "BOOKMARK"]  # bookmarks may come in between
    assert [(e.type, e.name, e.object["spec"].get("holderIdentity")) for e in changes] == [
        ("ADDED", SLOT_0, "node-1"),
        ("MODIFIED", SLOT_0, None),
        ("DELETED", SLOT_0, None),
    ]
    assert all(e.object["metadata"]["namespace"] == NS for e in changes)
    assert events[-1].type == "BOOKMARK"
    assert int(version(events[-1].object)) >= int(version(changes[-1].object))
    assert kube_api.requests(verb="watch", plural="leases")[0].query["allowWatchBookmarks"]


def test_a_watch_from_a_compacted_resource_version_expires(
    kube_api: KubeApiServer, agent_api: KubeApi
) -> None:
    agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    start = agent_api.list_leases(NS, request_timeout=TIMEOUT).resource_version
    agent_api.create_lease(NS, lease(SLOT_2, "node-3"), request_timeout=TIMEOUT)
    kube_api.compact()
    agent_api.create_lease(NS, lease(SLOT_1, "node-2"), request_timeout=TIMEOUT)

    stream = agent_api.watch_leases(
        NS, resource_version=start, timeout_seconds=5, request_timeout=TIMEOUT
    )
    with pytest.raises(WatchExpired, match="watch leases: resourceVersion expired"):
        list(stream)
    stream.close()


# --- errors ---------------------------------------------------------------------------------


def call(api: KubeApi, verb: str) -> object:
    """One LeaseApi call per verb the server sees."""
    if verb == "list":
        return api.list_leases(NS, request_timeout=TIMEOUT)
    if verb == "watch":
        return list(
            api.watch_leases(NS, resource_version="1", timeout_seconds=1, request_timeout=TIMEOUT)
        )
    if verb == "create":
        return api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    stored = {**lease(SLOT_0, "node-1"), "metadata": {"name": SLOT_0, "resourceVersion": "1"}}
    return api.replace_lease(ObjectRef(NS, SLOT_0), stored, request_timeout=TIMEOUT)


@pytest.mark.parametrize("verb", ["list", "watch", "create", "update"])
def test_forbidden_names_what_to_allow(
    kube_api: KubeApiServer, agent_api: KubeApi, verb: str
) -> None:
    kube_api.fail_next(403, verb=verb)

    with pytest.raises(ApiForbidden) as raised:
        call(agent_api, verb)

    assert raised.value.reason == "forbidden"
    message = str(raised.value)
    assert f"RBAC forbids {verb} on leases in namespace {NS} (403)" in message
    assert f"allow the agent's ServiceAccount to {PERMISSION} (API server: " in message
    assert f'cannot {verb} resource "leases" in API group "coordination.k8s.io"' in message


def test_rejected_credentials_are_forbidden(kube_api: KubeApiServer, agent_api: KubeApi) -> None:
    kube_api.fail_next(401)

    with pytest.raises(ApiForbidden, match="list leases: the API server rejected"):
        agent_api.list_leases(NS, request_timeout=TIMEOUT)


@pytest.mark.parametrize("verb", ["list", "watch", "create", "update"])
def test_an_outage_is_unavailable(kube_api: KubeApiServer, agent_api: KubeApi, verb: str) -> None:
    with (
        kube_api.outage(),
        pytest.raises(ApiUnavailable, match="leases: cannot reach") as raised,
    ):
        call(agent_api, verb)

    assert raised.value.reason == "unreachable"


@pytest.mark.parametrize("code", [500, 503])
def test_server_errors_are_unavailable(
    kube_api: KubeApiServer, agent_api: KubeApi, code: int
) -> None:
    kube_api.fail_next(code, verb="create")

    with pytest.raises(ApiUnavailable, match=f"create leases: API answered {code}"):
        agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)


# --- the restart-slot audit -----------------------------------------------------------------


def test_the_timeline_tells_acquire_renew_release_takeover_and_delete(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    ref = ObjectRef(NS, SLOT_0)
    stored = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    clock.advance(10)
    stored = agent_api.replace_lease(ref, with_holder(stored, "node-1"), request_timeout=TIMEOUT)
    clock.advance(TTL)
    stored = agent_api.replace_lease(ref, with_holder(stored, "node-2"), request_timeout=TIMEOUT)
    stored = agent_api.replace_lease(ref, with_holder(stored, None), request_timeout=TIMEOUT)
    kube_api.delete_lease(NS, SLOT_0)

    timeline = kube_api.slot_timeline(NS)

    assert kinds(kube_api) == [
        (SLOT_0, "", "node-1", "acquire"),
        (SLOT_0, "node-1", "node-1", "renew"),
        (SLOT_0, "node-1", "node-2", "takeover"),
        (SLOT_0, "node-2", "", "release"),
        (SLOT_0, "", "", "delete"),
    ]
    assert [c.at for c in timeline] == [1000.0, 1010.0, 1040.0, 1040.0, 1040.0]
    assert timeline[3].resource_version == version(stored)
    assert kube_api.violations() == []


def test_a_free_slot_created_empty_is_neither_acquired_nor_held(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    agent_api.create_lease(NS, lease(SLOT_0, None), request_timeout=TIMEOUT)

    assert kube_api.slot_timeline() == [
        SlotChange(1000.0, NS, SLOT_0, "", "", "free", version(kube_api.lease(NS, SLOT_0) or {}))
    ]


def test_a_takeover_after_the_lease_duration_unchanged_is_allowed(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    held = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    clock.advance(TTL)

    agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), with_holder(held, "node-2"), request_timeout=TIMEOUT
    )

    assert kube_api.violations() == []


def test_a_takeover_while_still_renewed_is_recorded(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    held = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    clock.advance(TTL - 0.5)

    agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), with_holder(held, "node-2"), request_timeout=TIMEOUT
    )

    assert take_violations(kube_api) == [
        f"{NS}/{SLOT_0} taken from node-1 by node-2 while still renewed: last changed "
        f"29.500s ago, leaseDurationSeconds {TTL}"
    ]
    assert kinds(kube_api)[-1] == (SLOT_0, "node-1", "node-2", "takeover")


def test_a_renewal_restarts_the_lease_duration(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    ref = ObjectRef(NS, SLOT_0)
    held = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    clock.advance(TTL / 3)
    renewed = agent_api.replace_lease(ref, with_holder(held, "node-1"), request_timeout=TIMEOUT)
    clock.advance(TTL - 1)  # long after the acquisition, not after the renewal

    agent_api.replace_lease(ref, with_holder(renewed, "node-2"), request_timeout=TIMEOUT)

    assert [v.split(":")[0] for v in take_violations(kube_api)] == [
        f"{NS}/{SLOT_0} taken from node-1 by node-2 while still renewed"
    ]


def test_the_lease_duration_is_the_one_of_the_lease_taken(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    held = agent_api.create_lease(NS, lease(SLOT_0, "node-1", ttl=10), request_timeout=TIMEOUT)
    clock.advance(10)

    agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), with_holder(held, "node-2"), request_timeout=TIMEOUT
    )

    assert kube_api.violations() == []


def test_a_slot_freed_by_an_operator_can_be_acquired_at_once(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)

    kube_api.release_lease(NS, SLOT_0)
    freed = kube_api.lease(NS, SLOT_0) or {}
    agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), with_holder(freed, "node-2"), request_timeout=TIMEOUT
    )

    assert "holderIdentity" not in freed["spec"]
    assert kinds(kube_api)[1:] == [
        (SLOT_0, "node-1", "", "release"),
        (SLOT_0, "", "node-2", "acquire"),
    ]
    assert kube_api.violations() == []


def test_one_holder_on_two_slots_is_recorded(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    agent_api.create_lease(NS, lease(SLOT_1, "node-1"), request_timeout=TIMEOUT)

    assert take_violations(kube_api) == [
        f"node-1 holds two restart slots at once: {NS}/{SLOT_0} and {NS}/{SLOT_1}"
    ]


def test_a_holder_may_move_to_another_slot_after_releasing_its_own(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    held = agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)
    agent_api.replace_lease(ObjectRef(NS, SLOT_0), with_holder(held, None), request_timeout=TIMEOUT)
    agent_api.create_lease(NS, lease(SLOT_1, "node-1"), request_timeout=TIMEOUT)
    agent_api.create_lease("elsewhere", lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)

    assert kube_api.violations() == []


def test_more_holders_than_max_holders_is_recorded(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    kube_api.slot_audit.max_holders = 2
    for name, holder in ((SLOT_0, "node-1"), (SLOT_1, "node-2"), (SLOT_2, "node-3")):
        agent_api.create_lease(NS, lease(name, holder), request_timeout=TIMEOUT)

    assert take_violations(kube_api) == [
        f"3 restart slots held at once in {NS}, more than max_holders 2: node-1, node-2, node-3"
    ]


def test_an_update_without_resource_version_is_recorded_and_applied_like_the_real_server(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    agent_api.create_lease(NS, lease(SLOT_0, "node-1"), request_timeout=TIMEOUT)

    stored = agent_api.replace_lease(
        ObjectRef(NS, SLOT_0), lease(SLOT_0, "node-1", renewed=LATER), request_timeout=TIMEOUT
    )

    assert stored["spec"]["renewTime"] == LATER
    assert take_violations(kube_api) == [
        f"update of lease {NS}/{SLOT_0} without metadata.resourceVersion (unconditional)"
    ]


def test_a_patch_of_any_lease_is_recorded(kube_api: KubeApiServer, clock: ManualClock) -> None:
    kube_api.store.create(LEASES, NS, lease("kube-scheduler", "node-1"))
    request = urllib.request.Request(
        f"{kube_api.url}/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/kube-scheduler",
        data=json.dumps({"spec": {"renewTime": LATER}}).encode(),
        method="PATCH",
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/merge-patch+json",
        },
    )

    with urllib.request.urlopen(request, timeout=2) as answer:
        patched = json.load(answer)

    assert patched["spec"]["renewTime"] == LATER
    assert take_violations(kube_api) == [
        f"patch of lease {NS}/kube-scheduler (application/merge-patch+json): Leases change "
        "only by updates carrying the resourceVersion read"
    ]


def test_leases_that_are_not_restart_slots_are_not_audited_for_holders(
    kube_api: KubeApiServer, agent_api: KubeApi, clock: ManualClock
) -> None:
    held = agent_api.create_lease(NS, lease("kube-scheduler", "node-1"), request_timeout=TIMEOUT)
    agent_api.replace_lease(
        ObjectRef(NS, "kube-scheduler"), with_holder(held, "node-2"), request_timeout=TIMEOUT
    )

    assert kube_api.slot_timeline() == []
    assert kube_api.violations() == []
