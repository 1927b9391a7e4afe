"""Fixtures for integration tests against a real containerd and a real registry.

Every test under ``integration/`` needs root, ``/usr/bin/containerd``,
``/usr/bin/docker-registry`` and ``htpasswd`` (Debian: ``containerd docker-registry
apache2-utils``; ``.ci/install-system-deps.sh`` installs them). Without them the tests are
skipped with the reason, unless ``NODE_AGENT_REQUIRE_INTEGRATION=1`` is set: then they fail, so
CI cannot go green by skipping.

Fixtures (all function-scoped: each test gets fresh processes and storage):

``auth_registry`` → :class:`integration.registry.AuthRegistry`
    A running htpasswd registry. ``.host`` (``127.0.0.1:PORT``), ``.username``, ``.password``,
    ``.rotate_password(new)``, ``.accepts(user, password)``, ``.url(path)``, ``.stop()``.
``pushed_image`` → :class:`integration.oci_image.PushedImage`
    A one-layer image already pushed to ``auth_registry``. ``.reference`` is what to pull.
``containerd_node`` → :class:`integration.containerd.ContainerdNode`
    A running containerd whose CRI answers. ``.config_path``, ``.socket_path``,
    ``.restart()``, ``.stop()``, ``.is_running()``, ``.cri()``, ``.restart_command`` (for
    ``node-agent reconcile --reload command --reload-command ...``), ``.break_next_restart()``.
``make_containerd_node`` → ``(name) -> ContainerdNode``
    More than one node in a test (restart slots): each call starts another containerd like
    ``containerd_node``'s, with its own root, state and sockets. ``name`` names the directory
    under ``tmp_path`` its log is kept in (``containerd-<name>/containerd.log``).

Processes are stopped at teardown whatever the test did; containerd's and the registry's logs
stay in the test's ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from integration.containerd import CONTAINERD_BINARY, ContainerdNode
from integration.oci_image import PushedImage, build_tiny_image, push_image
from integration.registry import REGISTRY_BINARY, AuthRegistry

TEST_REPOSITORY = "node-agent/tiny"
TEST_TAG = "v1"


def missing_prerequisites() -> list[str]:
    """Why the integration tests cannot run here; empty when they can."""
    missing = [] if os.geteuid() == 0 else ["not running as root"]
    for binary in (CONTAINERD_BINARY, REGISTRY_BINARY):
        if not os.access(binary, os.X_OK):
            missing.append(f"{binary} not installed")
    if shutil.which("htpasswd") is None:
        missing.append("htpasswd (apache2-utils) not installed")
    return missing


@pytest.fixture(autouse=True)
def _integration_prerequisites() -> None:
    """Skip (or, with NODE_AGENT_REQUIRE_INTEGRATION=1, fail) when the machine cannot run us."""
    missing = missing_prerequisites()
    if not missing:
        return
    reason = "integration prerequisites missing: " + "; ".join(missing)
    hint = " (as root: .ci/install-system-deps.sh, then pytest integration)"
    if os.environ.get("NODE_AGENT_REQUIRE_INTEGRATION") == "1":
        pytest.fail(reason + hint)
    pytest.skip(reason + hint)


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[AuthRegistry]:
    """A running docker-registry on 127.0.0.1 that needs Basic auth (see AuthRegistry)."""
    workdir = tmp_path / "registry"
    workdir.mkdir()
    registry = AuthRegistry(workdir=workdir)
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def pushed_image(auth_registry: AuthRegistry) -> PushedImage:
    """A tiny image pushed to ``auth_registry`` as ``node-agent/tiny:v1``."""
    return push_image(auth_registry, build_tiny_image(), repository=TEST_REPOSITORY, tag=TEST_TAG)


@pytest.fixture
def containerd_node(tmp_path: Path) -> Iterator[ContainerdNode]:
    """A running containerd with its own root/state/sockets, CRI ready (see ContainerdNode)."""
    node = ContainerdNode.create()
    try:
        node.start()
        yield node
    finally:
        node.destroy(keep_log_in=tmp_path)


@pytest.fixture
def make_containerd_node(tmp_path: Path) -> Iterator[Callable[[str], ContainerdNode]]:
    """Start one more containerd per call (see ContainerdNode); all destroyed at teardown."""
    with ExitStack() as teardown:

        def make(name: str) -> ContainerdNode:
            node = ContainerdNode.create()
            keep_log_in = tmp_path / f"containerd-{name}"
            keep_log_in.mkdir()
            teardown.callback(node.destroy, keep_log_in=keep_log_in)
            node.start()
            return node

        yield make
