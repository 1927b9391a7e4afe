"""A fake CRI: a real ``grpc.server`` on a unix socket answering just enough of CRI
(Version, PullImage, RemoveImage, ImageStatus) with canned behaviour. Shared by the CRI
client, runtime and daemon tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from cri_images import (
    IMAGE_STATUS_METHOD,
    PULL_IMAGE_METHOD,
    REMOVE_IMAGE_METHOD,
    AuthConfig,
    decode_auth_config,
)

from node_agent.cri import (
    VERSION_METHOD,
    RuntimeVersion,
    decode_message,
    encode_len_field,
    encode_string_field,
    last_bytes,
    last_string,
)

# What containerd 1.6.20 answers (seen on a real one).
CONTAINERD_VERSION = RuntimeVersion(
    version="0.1.0",
    runtime_name="containerd",
    runtime_version="1.6.20~ds1",
    runtime_api_version="v1",
)


def encode_version_response(version: RuntimeVersion) -> bytes:
    return b"".join(
        (
            encode_string_field(1, version.version),
            encode_string_field(2, version.runtime_name),
            encode_string_field(3, version.runtime_version),
            encode_string_field(4, version.runtime_api_version),
        )
    )


Handler = Callable[[bytes, grpc.ServicerContext], bytes]


@dataclass
class FakeCri:
    """Canned CRI behaviour served by a real ``grpc.server`` on a unix socket."""

    socket_path: str
    version: RuntimeVersion | None = CONTAINERD_VERSION
    """None: the server has no RuntimeService (UNIMPLEMENTED), like containerd without CRI."""
    required_auth: AuthConfig | None = None
    """Credentials a pull must carry; wrong ones fail with details that echo them back."""
    hang: threading.Event | None = None
    """When set, every call blocks until this event is set."""
    reply_garbage: bool = False

    requests: list[tuple[str, bytes]] = field(default_factory=list)
    images: set[str] = field(default_factory=set)
    _server: Any = None

    def start(self) -> FakeCri:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((_Router(self),))
        self._server.add_insecure_port("unix://" + self.socket_path)
        self._server.start()
        return self

    def stop(self) -> None:
        if self.hang is not None:
            self.hang.set()
        self._server.stop(grace=None).wait()

    def handler(self, method: str) -> Handler | None:
        handlers: dict[str, Handler] = {
            PULL_IMAGE_METHOD: self._pull_image,
            REMOVE_IMAGE_METHOD: self._remove_image,
            IMAGE_STATUS_METHOD: self._image_status,
        }
        if self.version is not None:
            handlers[VERSION_METHOD] = self._version
        handler = handlers.get(method)
        return None if handler is None else self._recorded(method, handler)

    def _recorded(self, method: str, handler: Handler) -> Handler:
        def serve(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.requests.append((method, request))
            if self.hang is not None:
                self.hang.wait()
            return b"\x0f" if self.reply_garbage else handler(request, context)

        return serve

    def _version(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        assert self.version is not None
        return encode_version_response(self.version)

    def _pull_image(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        image, auth = image_and_auth(request)
        if self.required_auth is not None and auth != self.required_auth:
            sent = auth or AuthConfig()
            # Deliberately careless, like a registry error quoting what it got.
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"401 Unauthorized for {sent.username}:{sent.password} ({sent.auth})",
            )
        self.images.add(image)
        return encode_string_field(1, "sha256:" + image.encode().hex())

    def _remove_image(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.images.discard(_image(request))
        return b""

    def _image_status(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        image = _image(request)
        if image not in self.images:
            return b""
        found = encode_string_field(1, "sha256:x") + encode_string_field(2, image)
        return encode_len_field(1, found) + encode_len_field(99, b"unknown to the client")


class _Router:
    """A generic RPC handler (grpc only needs ``service``), resolving methods on each call."""

    def __init__(self, fake: FakeCri) -> None:
        self._fake = fake

    def service(self, handler_call_details: Any) -> Any:
        handler = self._fake.handler(handler_call_details.method)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED
        return grpc.unary_unary_rpc_method_handler(handler)


def _image(request: bytes) -> str:
    image_spec = last_bytes(decode_message(request), 1) or b""
    return last_string(decode_message(image_spec), 1)


def image_and_auth(request: bytes) -> tuple[str, AuthConfig | None]:
    auth_bytes = last_bytes(decode_message(request), 2)
    return _image(request), None if auth_bytes is None else decode_auth_config(auth_bytes)
