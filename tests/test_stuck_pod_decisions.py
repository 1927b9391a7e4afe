"""The pure decisions of stuck-pod recovery: image → registry, credential key matching, when a
change is effective, which pods are stuck, what is done with each, the eviction budget."""

from typing import Any

import pytest

from node_agent.stuck_pods.decisions import (
    KUBELET_CREDENTIAL_CACHE_SECONDS,
    AppliedChange,
    Memory,
    StuckPod,
    budget_frees_at,
    decide,
    effective,
    evictions_allowed,
    recoveries,
    registry_effective,
    stuck_pod,
)
from node_agent.stuck_pods.images import image_registry, serves

# --- images and keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("nginx", "docker.io"),
        ("nginx:1.27", "docker.io"),
        ("library/nginx@sha256:abc", "docker.io"),
        ("team/app:1.0", "docker.io"),
        ("docker.io/team/app", "docker.io"),
        ("index.docker.io/team/app", "docker.io"),
        ("registry-1.docker.io/team/app", "docker.io"),
        ("Reg.Example.com/team/app:1.0", "reg.example.com"),
        ("reg.example:5000/app", "reg.example:5000"),
        ("localhost/app", "localhost"),
        ("localhost:5000/app", "localhost:5000"),
        ("[::1]:5000/app", "[::1]:5000"),
        ("not a host.example/app", None),
    ],
)
def test_an_image_is_pulled_from_the_registry_its_first_component_names(
    image: str, registry: str | None
) -> None:
    assert image_registry(image) == registry


@pytest.mark.parametrize(
    ("key", "registry", "served"),
    [
        ("reg.example", "reg.example", True),
        ("reg.example", "other.example", False),
        ("reg.example:5000", "reg.example:5000", True),
        ("reg.example:5000", "reg.example", False),
        ("reg.example", "reg.example:5000", False),
        ("reg.example:5000", "reg.example:5001", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.*", "reg.example", True),
        ("*", "localhost", True),
        ("docker.io", "docker.io", True),
        ("[::1]:5000", "[::1]:5000", True),
        ("[::1]:5000", "[::2]:5000", False),
    ],
)
def test_a_key_serves_a_registry_label_by_label_with_the_same_port(
    key: str, registry: str, served: bool
) -> None:
    assert serves(key, registry) is served


# --- effective ------------------------------------------------------------------------------


def change(
    target: str, *, at: float = 100.0, replaced: bool = False, **extra: Any
) -> AppliedChange:
    return AppliedChange(target=target, registry="reg.example", at=at, replaced=replaced, **extra)


@pytest.mark.parametrize(
    ("applied", "effective_at"),
    [
        (change("containerd", restart="healthy"), 100.0),
        (change("containerd", restart="not_needed"), 100.0),
        (change("containerd", restart="failed"), None),
        (change("kubelet"), 100.0 + KUBELET_CREDENTIAL_CACHE_SECONDS),
        (change("credential-provider-response"), 100.0),
        (change("credential-provider-response", restart="owed"), None),
        (change("credential-provider-config"), None),
        (change("a-target-nobody-knows"), None),
    ],
    ids=[
        "containerd restarted healthy: at once",
        "containerd without a restart owed: at once",
        "containerd restart failed: never",
        "kubelet: after its cache expired",
        "credential provider response: at once",
        "credential provider, registry new to the kubelet's config: not before its restart",
        "the kubelet's provider config serves no registry itself",
        "unknown target: never",
    ],
)
def test_when_each_target_makes_a_change_effective(
    applied: AppliedChange, effective_at: float | None
) -> None:
    effect = effective(applied)
    assert (effect.at if effect else None) == effective_at


def test_a_new_registry_is_effective_when_the_first_target_serves_it() -> None:
    effect = registry_effective(
        [change("kubelet", at=100.0), change("containerd", at=130.0, restart="healthy")]
    )
    assert effect is not None and effect.at == 130.0
    assert "containerd" in effect.why


def test_a_rotation_waits_for_kubelet_which_sends_the_old_credential_from_its_cache() -> None:
    effect = registry_effective(
        [change("kubelet", at=100.0, replaced=True), change("containerd", restart="healthy")]
    )
    assert effect is not None and effect.at == 100.0 + KUBELET_CREDENTIAL_CACHE_SECONDS


def test_a_registry_only_written_where_it_cannot_serve_is_never_effective() -> None:
    assert registry_effective([change("containerd", restart="failed")]) is None
    assert registry_effective([]) is None


# --- pods -----------------------------------------------------------------------------------

NODE = "node-1"


def pod(
    *,
    name: str = "app-1",
    node: str = NODE,
    image: str = "reg.example/team/app:1.0",
    waiting: str | None = "ImagePullBackOff",
    init_image: str | None = None,
    init_waiting: str | None = None,
    controller: bool = True,
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"namespace": "team", "name": name, "uid": f"uid-{name}"}
    if controller:
        metadata["ownerReferences"] = [
            {"kind": "ReplicaSet", "name": "app", "uid": "rs-uid", "controller": True}
        ]
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-05T17:00:00Z"
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "app", "image": image}]}
    status: dict[str, Any] = {"containerStatuses": [container_status("app", image, waiting)]}
    if init_image is not None:
        spec["initContainers"] = [{"name": "init", "image": init_image}]
        status["initContainerStatuses"] = [container_status("init", init_image, init_waiting)]
    return {"metadata": metadata, "spec": spec, "status": status}


def container_status(name: str, image: str, waiting: str | None) -> dict[str, Any]:
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {"name": name, "image": image, "state": state}


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff"])
def test_a_container_waiting_on_a_failed_pull_makes_the_pod_stuck(reason: str) -> None:
    found = stuck_pod(pod(waiting=reason), node=NODE)
    assert found is not None and found.controller == "ReplicaSet/app"
    assert [(c.name, c.reason) for c in found.containers] == [("app", reason)]


def test_an_init_container_waiting_on_a_failed_pull_makes_the_pod_stuck() -> None:
    found = stuck_pod(
        pod(waiting="PodInitializing", init_image="reg.example/init", init_waiting="ErrImagePull"),
        node=NODE,
    )
    assert found is not None and found.registry_served_by(["reg.example"]) == "reg.example"


@pytest.mark.parametrize(
    "obj",
    [
        pod(waiting=None),
        pod(waiting="CrashLoopBackOff"),
        pod(node="node-2"),
        pod(deleting=True),
        {"metadata": {}, "spec": {}, "status": {}},
    ],
    ids=["running", "crash loop", "another node", "being deleted", "empty"],
)
def test_other_pods_are_not_stuck(obj: dict[str, Any]) -> None:
    assert stuck_pod(obj, node=NODE) is None


def stuck(**options: Any) -> StuckPod:
    found = stuck_pod(pod(**options), node=NODE)
    assert found is not None
    return found


def test_only_pods_stuck_on_an_effective_registry_are_chosen() -> None:
    on_reg = stuck(name="a")
    on_other = stuck(name="b", image="other.example/app")
    on_hub = stuck(name="c", image="team/app")
    chosen = recoveries([on_reg, on_other, on_hub], ["reg.example", "docker.io"], Memory())
    assert [(r.pod.name, r.registry, r.action) for r in chosen] == [
        ("a", "reg.example", "evict"),
        ("c", "docker.io", "evict"),
    ]


def test_a_wildcard_key_chooses_the_pods_of_every_host_it_matches() -> None:
    chosen = recoveries([stuck(image="a.example.com/app")], ["*.example.com"], Memory())
    assert [r.registry for r in chosen] == ["*.example.com"]


@pytest.mark.parametrize(
    ("memory", "controller", "action"),
    [
        (Memory(), True, "evict"),
        (Memory(evicted={"uid-app-1"}), True, None),
        (Memory(), False, "tell"),
        (Memory(told={"uid-app-1"}), False, None),
        (Memory(recovered={("rs-uid", "reg.example")}), True, "report"),
        (Memory(recovered={("rs-uid", "reg.example")}, reported={"uid-app-1"}), True, None),
        (
            Memory(recovered={("rs-uid", "reg.example")}, candidates={"uid-app-1"}),
            True,
            "evict",
        ),
        (Memory(recovered={("rs-uid", "other.example")}), True, "evict"),
    ],
    ids=[
        "owned: evicted",
        "evicted once, never again",
        "no controller: told, never deleted",
        "told once",
        "a replacement failing again: reported, left to kubelet",
        "reported once",
        "a sibling chosen before the eviction: still evicted",
        "recovered for another registry: evicted",
    ],
)
def test_what_is_done_with_a_stuck_pod(memory: Memory, controller: bool, action: str) -> None:
    assert decide(stuck(controller=controller), "reg.example", memory) == action


# --- the budget -----------------------------------------------------------------------------


def test_the_budget_counts_the_evictions_of_the_last_minute() -> None:
    attempts = [0.0, 10.0, 59.0]
    assert evictions_allowed(attempts, now=59.5, per_minute=3) == 0
    assert evictions_allowed(attempts, now=60.0, per_minute=3) == 1
    assert evictions_allowed([], now=0.0, per_minute=3) == 3
    assert budget_frees_at(attempts, now=59.5) == 60.0
    assert budget_frees_at([], now=5.0) == 5.0
