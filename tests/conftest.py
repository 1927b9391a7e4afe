"""Fixtures shared by the test modules. Append new fixtures; keep existing ones intact."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubeapi import KubeApiServer


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[KubeApiServer]:
    """A test Kubernetes API server on 127.0.0.1 (tests/kubeapi.py), with short bookmarks.

    `kube_api.kubeconfig_path` points the real `kubernetes` client at it. The test fails if
    the server itself hit an unexpected error.
    """
    with KubeApiServer(kubeconfig_path=tmp_path / "kubeconfig", bookmark_interval=0.1) as server:
        yield server
    assert server.unexpected_errors == []
