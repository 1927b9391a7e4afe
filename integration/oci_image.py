"""Build a tiny OCI image in memory and push it with the registry HTTP API v2 (stdlib only).

The image has one layer (a gzipped tar holding one small text file) and a config whose
platform is this machine's, so containerd's platform matcher accepts it when it pulls the
manifest directly (there is no index).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from integration.processes import HarnessError
from integration.registry import AuthRegistry, http_request

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"

# Python's machine names → the GOARCH names images and containerd use.
_GO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes with the descriptor fields that point at them."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclass(frozen=True)
class TinyImage:
    """The three parts of a one-layer image, ready to push."""

    layer: Blob
    config: Blob
    manifest: Blob


@dataclass(frozen=True)
class PushedImage:
    """An image that is in the registry.

    ``reference`` (``127.0.0.1:PORT/repo:tag``) is what a CRI PullImage asks for;
    ``manifest_digest`` is what the registry returns as ``Docker-Content-Digest``.
    """

    host: str
    repository: str
    tag: str
    manifest_digest: str

    @property
    def reference(self) -> str:
        return f"{self.host}/{self.repository}:{self.tag}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def go_architecture() -> str:
    machine = platform.machine().lower()
    return _GO_ARCH.get(machine, machine)


def layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of regular files with fixed metadata, so the digest is stable."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(content)
            member.mode = 0o644
            archive.addfile(member, io.BytesIO(content))
    return buffer.getvalue()


def build_tiny_image(*, text: str = "hello from the node-agent integration tests\n") -> TinyImage:
    """One layer with ``/hello.txt``; ``diff_ids`` hold the digest of the *uncompressed* tar."""
    tar = layer_tar({"hello.txt": text.encode()})
    layer = Blob(LAYER_MEDIA_TYPE, gzip.compress(tar, mtime=0))
    config_document = {
        "architecture": go_architecture(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]},
    }
    config = Blob(CONFIG_MEDIA_TYPE, _canonical_json(config_document))
    manifest_document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    }
    return TinyImage(layer, config, Blob(MANIFEST_MEDIA_TYPE, _canonical_json(manifest_document)))


def push_image(
    registry: AuthRegistry, image: TinyImage, *, repository: str, tag: str
) -> PushedImage:
    """Upload both blobs (POST then monolithic PUT) and PUT the manifest, with Basic auth."""
    for blob in (image.layer, image.config):
        _upload_blob(registry, repository, blob)
    reply = http_request(
        "PUT",
        registry.url(f"/v2/{repository}/manifests/{tag}"),
        body=image.manifest.data,
        headers={**registry.auth_headers(), "Content-Type": image.manifest.media_type},
    )
    _expect(reply.status, 201, f"PUT manifest {repository}:{tag}", reply.body)
    digest = reply.headers.get("docker-content-digest", image.manifest.digest)
    return PushedImage(registry.host, repository, tag, digest)


def _upload_blob(registry: AuthRegistry, repository: str, blob: Blob) -> None:
    started = http_request(
        "POST", registry.url(f"/v2/{repository}/blobs/uploads/"), headers=registry.auth_headers()
    )
    _expect(started.status, 202, f"POST blob upload for {repository}", started.body)
    location = urllib.parse.urljoin(registry.url("/"), started.headers["location"])
    separator = "&" if "?" in location else "?"
    finished = http_request(
        "PUT",
        f"{location}{separator}digest={urllib.parse.quote(blob.digest)}",
        body=blob.data,
        headers={**registry.auth_headers(), "Content-Type": "application/octet-stream"},
    )
    _expect(finished.status, 201, f"PUT blob {blob.digest}", finished.body)


def _expect(status: int, wanted: int, what: str, body: bytes) -> None:
    if status != wanted:
        raise HarnessError(f"{what}: HTTP {status} (wanted {wanted}): {body[:300]!r}")


def _canonical_json(document: Mapping[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
