"""A fake CRI (tests/fake_cri.py) answering `Version` on a short unix socket path: socket
paths are limited to ~100 bytes, and pytest's tmp_path can be longer."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from fake_cri import CONTAINERD_VERSION, FakeCri

from node_agent.cri import RuntimeVersion


def containerd_version(runtime_version: str) -> RuntimeVersion:
    """What a containerd of `runtime_version` answers to CRI `Version`."""
    return RuntimeVersion("0.1.0", "containerd", runtime_version, "v1")


@contextmanager
def fake_cri_socket(
    prefix: str = "na-cri-", version: RuntimeVersion = CONTAINERD_VERSION
) -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    socket_path = os.path.join(directory, "cri.sock")
    fake = FakeCri(socket_path, version=version).start()
    try:
        yield socket_path
    finally:
        fake.stop()
        shutil.rmtree(directory, ignore_errors=True)
