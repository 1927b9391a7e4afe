"""A minimal CRI client over containerd's unix socket.

Only the four calls node-agent needs: ``Version`` (the health check after a restart, because
a config error can leave containerd up with its CRI plugin down) and ``PullImage``,
``RemoveImage``, ``ImageStatus`` (used by the integration tests to prove that the auth we
wrote is the auth containerd uses).

The protobuf wire format is encoded and decoded by hand: the messages are tiny, and this
avoids depending on ``protobuf`` and on generated code that must match a ``.proto`` file.
Field numbers follow ``k8s.io/cri-api/pkg/apis/runtime/v1/api.proto``.

grpc is imported lazily, inside :class:`CriClient`, so that importing this module (and the
daemon that imports it) stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from node_agent.escaping import bounded

# --- protobuf wire format -------------------------------------------------------------------

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5

_FIXED_WIDTH = {WIRE_FIXED64: 8, WIRE_FIXED32: 4}
_MAX_VARINT_BYTES = 10  # a uint64 needs at most ten 7-bit groups

FieldValue = int | bytes
"""A decoded field: an int for varint/fixed wire types, the raw payload for length-delimited."""

Fields = dict[int, list[FieldValue]]
"""Decoded message: field number → values in wire order (repeated fields keep every value)."""


class ProtoDecodeError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def encode_varint(value: int) -> bytes:
    """Base-128 varint, least significant group first. Negative ints are not used by CRI."""
    if value < 0:
        raise ValueError("negative varints are not supported")
    out = bytearray()
    while True:
        low7 = value & 0x7F
        value >>= 7
        if not value:
            out.append(low7)
            return bytes(out)
        out.append(low7 | 0x80)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Read one varint at ``pos``; returns ``(value, position after it)``."""
    value = 0
    for index in range(_MAX_VARINT_BYTES):
        if pos + index >= len(data):
            raise ProtoDecodeError("truncated varint")
        byte = data[pos + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, pos + index + 1
    raise ProtoDecodeError("varint longer than 10 bytes")


def encode_len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or nested message), always emitted."""
    return encode_varint(number << 3 | WIRE_LEN) + encode_varint(len(payload)) + payload


def encode_string_field(number: int, text: str) -> bytes:
    """A proto3 string field; the empty string is the default and is not emitted."""
    return encode_len_field(number, text.encode()) if text else b""


def decode_message(data: bytes) -> Fields:
    """Split a message into its fields. Unknown fields are kept; callers ignore them."""
    fields: Fields = {}
    pos = 0
    while pos < len(data):
        key, pos = decode_varint(data, pos)
        number, wire_type = key >> 3, key & 0x7
        if number == 0:
            raise ProtoDecodeError("field number 0")
        value, pos = _decode_value(data, pos, wire_type)
        fields.setdefault(number, []).append(value)
    return fields


def _decode_value(data: bytes, pos: int, wire_type: int) -> tuple[FieldValue, int]:
    if wire_type == WIRE_VARINT:
        return decode_varint(data, pos)
    if wire_type == WIRE_LEN:
        length, pos = decode_varint(data, pos)
        return _take(data, pos, length)
    if wire_type in _FIXED_WIDTH:
        raw, end = _take(data, pos, _FIXED_WIDTH[wire_type])
        return int.from_bytes(raw, "little"), end
    # 3 and 4 are the deprecated groups; nothing in CRI uses them, so they mean corruption.
    raise ProtoDecodeError(f"unsupported wire type {wire_type}")


def _take(data: bytes, pos: int, length: int) -> tuple[bytes, int]:
    end = pos + length
    if end > len(data):
        raise ProtoDecodeError("truncated length-delimited field")
    return data[pos:end], end


def last_bytes(fields: Fields, number: int) -> bytes | None:
    """The payload of a length-delimited field, or ``None`` when absent.

    Protobuf says the last occurrence of a non-repeated field wins.
    """
    values = fields.get(number)
    if not values:
        return None
    value = values[-1]
    if not isinstance(value, bytes):
        raise ProtoDecodeError(f"field {number} is not length-delimited")
    return value


def last_string(fields: Fields, number: int) -> str:
    """A string field, ``""`` when absent (the proto3 default)."""
    raw = last_bytes(fields, number)
    if raw is None:
        return ""
    try:
        return raw.decode()
    except UnicodeDecodeError as error:
        raise ProtoDecodeError(f"field {number} is not valid UTF-8") from error


# --- CRI messages ---------------------------------------------------------------------------

CRI_API_VERSION = "v1"


@dataclass(frozen=True)
class RuntimeVersion:
    """``VersionResponse``: what the runtime says about itself."""

    version: str
    """Version of the kubelet runtime API the runtime speaks (containerd 1.6: ``0.1.0``)."""
    runtime_name: str
    """Name of the container runtime, e.g. ``containerd``."""
    runtime_version: str
    """Version of the runtime itself, e.g. ``1.6.20~ds1``."""
    runtime_api_version: str
    """API version of the runtime, e.g. ``v1``."""


def encode_version_request() -> bytes:
    return encode_string_field(1, CRI_API_VERSION)


def decode_version_response(data: bytes) -> RuntimeVersion:
    fields = decode_message(data)
    return RuntimeVersion(
        version=last_string(fields, 1),
        runtime_name=last_string(fields, 2),
        runtime_version=last_string(fields, 3),
        runtime_api_version=last_string(fields, 4),
    )


# --- client ---------------------------------------------------------------------------------

VERSION_METHOD = "/runtime.v1.RuntimeService/Version"

_MAX_DETAIL_CHARS = 500
_REDACTED = "<redacted>"

# A restart makes the socket disappear for a second or two. gRPC's default reconnect backoff
# (1 s growing to 120 s) would hide a containerd that is already back, so keep it short; and a
# channel-local subchannel pool stops one client's backoff from leaking into the next.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 200),
    ("grpc.use_local_subchannel_pool", 1),
)


class CriError(Exception):
    """A CRI call failed. ``code`` is the gRPC status name (``UNAVAILABLE``, ``UNKNOWN``…).

    The message never contains a credential: values sent in the call are scrubbed out of the
    runtime's error details.
    """

    def __init__(self, method: str, code: str, details: str) -> None:
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"{method}: {code}: {details}")


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every secret value in ``text`` and cap its length."""
    # Longest first, so a secret that contains another one is replaced whole.
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    return bounded(text, _MAX_DETAIL_CHARS)


def _socket_target(socket_path: str) -> str:
    # "unix://" needs an absolute path; a relative one would be read as an authority.
    return "unix://" + os.path.abspath(socket_path)


class CriClient:
    """Blocking client for CRI `Version`, the one call node-agent makes (any other unary call
    through `call`). Use as a context manager."""

    def __init__(self, socket_path: str, *, timeout: float = 5.0) -> None:
        import grpc  # noqa: PLC0415  (lazy: grpc costs ~50 ms to import)

        self._grpc: Any = grpc
        self._timeout = timeout
        self._channel: Any = grpc.insecure_channel(
            _socket_target(socket_path), options=_CHANNEL_OPTIONS
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def version(self, *, timeout: float | None = None) -> RuntimeVersion:
        """The runtime's ``Version``. ``timeout`` overrides the client's default."""
        reply = self.call(VERSION_METHOD, encode_version_request(), timeout=timeout)
        return decoded(VERSION_METHOD, decode_version_response, reply)

    def close(self) -> None:
        self._channel.close()

    def call(
        self,
        method: str,
        request: bytes,
        *,
        timeout: float | None = None,
        secrets: tuple[str, ...] = (),
    ) -> bytes:
        # No serializers: requests and replies are the raw bytes encoded above.
        stub = self._channel.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        try:
            reply: bytes = stub(request, timeout=self._timeout if timeout is None else timeout)
        except self._grpc.RpcError as error:
            failure = CriError(method, error.code().name, scrub(error.details() or "", secrets))
            if secrets:
                # The original error holds the unscrubbed details; chaining it would put them
                # in every traceback that gets logged.
                raise failure from None
            raise failure from error
        return reply


_Decoded = TypeVar("_Decoded")


def decoded(method: str, decode: Callable[[bytes], _Decoded], reply: bytes) -> _Decoded:
    """`reply` decoded, a malformed one as a CriError."""
    try:
        return decode(reply)
    except ProtoDecodeError as error:
        raise CriError(method, "INTERNAL", f"malformed reply: {error}") from error
