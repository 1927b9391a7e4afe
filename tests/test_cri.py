"""The hand-written protobuf codec, and CriClient against a real gRPC server on a unix socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cri_images import (
    PULL_IMAGE_METHOD,
    AuthConfig,
    ImageClient,
    decode_auth_config,
    decode_image_status_response,
    decode_pull_image_response,
    encode_auth_config,
    encode_image_status_request,
    encode_pull_image_request,
    encode_remove_image_request,
)
from fake_cri import CONTAINERD_VERSION, FakeCri, encode_version_response
from fake_cri import image_and_auth as _image_and_auth
from hypothesis import given
from hypothesis import strategies as st

from node_agent.cri import (
    VERSION_METHOD,
    WIRE_FIXED32,
    WIRE_FIXED64,
    WIRE_VARINT,
    CriClient,
    CriError,
    ProtoDecodeError,
    RuntimeVersion,
    decode_message,
    decode_varint,
    decode_version_response,
    encode_len_field,
    encode_string_field,
    encode_varint,
    encode_version_request,
    last_bytes,
    last_string,
)

SECRET_AUTH = AuthConfig(username="puller", password="s3cr3t-pa55", auth="cHVsbGVyOnMzY3IzdA==")


def key(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


# --- varints --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (2**64 - 1, b"\xff" * 9 + b"\x01"),
    ],
)
def test_varint_matches_protobuf_encoding(value: int, wire: bytes) -> None:
    assert encode_varint(value) == wire
    assert decode_varint(wire, 0) == (value, len(wire))


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trip(value: int) -> None:
    wire = encode_varint(value)
    assert decode_varint(b"junk" + wire, 4) == (value, 4 + len(wire))


def test_negative_varint_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        encode_varint(-1)


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("empty", b""),
        ("continuation bit on last byte", b"\x80"),
        ("longer than 10 bytes", b"\x80" * 10 + b"\x01"),
    ],
)
def test_malformed_varint_is_rejected(name: str, wire: bytes) -> None:
    with pytest.raises(ProtoDecodeError):
        decode_varint(wire, 0)


# --- messages -------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(1, 2**29 - 1), st.text())))
def test_length_delimited_fields_round_trip_in_order(pairs: list[tuple[int, str]]) -> None:
    wire = b"".join(encode_len_field(number, text.encode()) for number, text in pairs)
    expected: dict[int, list[int | bytes]] = {}
    for number, text in pairs:
        expected.setdefault(number, []).append(text.encode())
    assert decode_message(wire) == expected


def test_empty_strings_are_not_sent_proto3_default() -> None:
    assert encode_string_field(1, "") == b""
    assert last_string(decode_message(b""), 1) == ""


def test_last_occurrence_of_a_field_wins() -> None:
    wire = encode_string_field(2, "old") + encode_string_field(2, "new")
    assert last_string(decode_message(wire), 2) == "new"


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    wire = b"".join(
        (
            key(9, WIRE_VARINT) + encode_varint(2**40),
            encode_string_field(2, "containerd"),
            key(10, WIRE_FIXED64) + (7).to_bytes(8, "little"),
            encode_len_field(11, encode_string_field(1, "nested unknown")),
            key(12, WIRE_FIXED32) + (5).to_bytes(4, "little"),
            encode_string_field(4, "v1"),
        )
    )
    version = decode_version_response(wire)
    assert version == RuntimeVersion("", "containerd", "", "v1")
    assert decode_message(wire)[10] == [7]


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("length beyond the end", encode_string_field(1, "abc")[:-1]),
        ("group wire type", key(1, 3)),
        ("field number zero", key(0, WIRE_VARINT) + b"\x00"),
        ("truncated fixed64", key(1, WIRE_FIXED64) + b"\x00" * 7),
        ("key without value", key(1, WIRE_VARINT)),
    ],
)
def test_malformed_message_is_rejected(name: str, wire: bytes) -> None:
    with pytest.raises(ProtoDecodeError):
        decode_message(wire)


def test_string_field_that_is_a_varint_is_rejected() -> None:
    with pytest.raises(ProtoDecodeError, match="not length-delimited"):
        last_bytes(decode_message(key(1, WIRE_VARINT) + b"\x05"), 1)


def test_invalid_utf8_string_is_rejected() -> None:
    with pytest.raises(ProtoDecodeError, match="UTF-8"):
        last_string(decode_message(encode_len_field(1, b"\xff")), 1)


def test_version_request_asks_for_v1() -> None:
    assert last_string(decode_message(encode_version_request()), 1) == "v1"


def test_version_response_as_containerd_sends_it() -> None:
    wire = encode_version_response(CONTAINERD_VERSION)
    assert decode_version_response(wire) == CONTAINERD_VERSION


def test_pull_without_auth_has_no_auth_field() -> None:
    fields = decode_message(encode_pull_image_request("127.0.0.1:5000/app:1", None))
    assert set(fields) == {1}
    image_spec = last_bytes(fields, 1)
    assert image_spec is not None
    assert last_string(decode_message(image_spec), 1) == "127.0.0.1:5000/app:1"


def test_pull_with_auth_nests_every_credential_field() -> None:
    auth = AuthConfig(username="u", password="p", auth="dTpw", identity_token="tok")
    fields = decode_message(encode_pull_image_request("example.org/app:1", auth))
    auth_bytes = last_bytes(fields, 2)
    assert auth_bytes is not None
    assert decode_auth_config(auth_bytes) == auth
    # identity_token is field 5 (4 is server_address, which we never send).
    assert set(decode_message(auth_bytes)) == {1, 2, 3, 5}


def test_pull_with_empty_auth_still_sends_the_auth_field() -> None:
    fields = decode_message(encode_pull_image_request("example.org/app:1", AuthConfig()))
    assert last_bytes(fields, 2) == b""


def test_remove_and_status_requests_carry_an_image_spec() -> None:
    for request in (encode_remove_image_request("a/b:c"), encode_image_status_request("a/b:c")):
        image_spec = last_bytes(decode_message(request), 1)
        assert image_spec is not None
        assert last_string(decode_message(image_spec), 1) == "a/b:c"


def test_image_status_is_present_only_with_an_image_field() -> None:
    image = encode_string_field(1, "sha256:abc") + encode_string_field(2, "a/b:c")
    assert decode_image_status_response(encode_len_field(1, image)) is True
    assert decode_image_status_response(b"") is False
    info_only = encode_len_field(2, encode_string_field(1, "k") + encode_string_field(2, "v"))
    assert decode_image_status_response(info_only) is False


def test_pull_response_gives_the_image_ref() -> None:
    assert decode_pull_image_response(encode_string_field(1, "sha256:abc")) == "sha256:abc"


def test_auth_config_repr_hides_values() -> None:
    auth = AuthConfig(username="puller", password="s3cr3t", auth="YWJj", identity_token="tok9")
    for value in ("puller", "s3cr3t", "YWJj", "tok9"):
        assert value not in repr(auth)
    assert encode_auth_config(AuthConfig()) == b""


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    return str(tmp_path / "cri.sock")


@pytest.fixture
def fake_cri(socket_path: str) -> Iterator[FakeCri]:
    fake = FakeCri(socket_path).start()
    yield fake
    fake.stop()


@pytest.fixture
def client(socket_path: str) -> Iterator[ImageClient]:
    with ImageClient(socket_path, timeout=2.0) as cri:
        yield cri


# --- CriClient ------------------------------------------------------------------------------


def test_version(fake_cri: FakeCri, client: ImageClient) -> None:
    assert client.version() == CONTAINERD_VERSION
    assert fake_cri.requests == [(VERSION_METHOD, encode_version_request())]


def test_pull_without_auth_sends_no_auth_field(fake_cri: FakeCri, client: ImageClient) -> None:
    ref = client.pull_image("127.0.0.1:5000/app:1")
    assert ref.startswith("sha256:")
    ((method, request),) = fake_cri.requests
    assert method == PULL_IMAGE_METHOD
    assert _image_and_auth(request) == ("127.0.0.1:5000/app:1", None)


def test_pull_with_auth_sends_it(fake_cri: FakeCri, client: ImageClient) -> None:
    fake_cri.required_auth = SECRET_AUTH
    client.pull_image("127.0.0.1:5000/app:1", auth=SECRET_AUTH)
    assert _image_and_auth(fake_cri.requests[0][1])[1] == SECRET_AUTH


def test_failed_pull_never_reveals_the_credentials(fake_cri: FakeCri, client: ImageClient) -> None:
    fake_cri.required_auth = AuthConfig(username="puller", password="the-right-one")
    with pytest.raises(CriError) as caught:
        client.pull_image("127.0.0.1:5000/app:1", auth=SECRET_AUTH)
    error = caught.value
    assert error.code == "UNKNOWN"
    assert "401 Unauthorized" in str(error)
    for text in (str(error), repr(error), error.details):
        for secret in SECRET_AUTH.secret_values():
            assert secret not in text
    # The gRPC error holds the unscrubbed details, so it is not chained.
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_failed_pull_without_auth_keeps_the_cause(fake_cri: FakeCri, client: ImageClient) -> None:
    fake_cri.required_auth = SECRET_AUTH
    with pytest.raises(CriError) as caught:
        client.pull_image("127.0.0.1:5000/app:1")
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_image_lifecycle(fake_cri: FakeCri, client: ImageClient) -> None:
    assert client.image_present("a/b:c") is False
    client.pull_image("a/b:c")
    assert client.image_present("a/b:c") is True
    client.remove_image("a/b:c")
    assert client.image_present("a/b:c") is False


def test_no_server_is_unavailable(client: ImageClient) -> None:
    with pytest.raises(CriError) as caught:
        client.version()
    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.method == VERSION_METHOD


def test_server_without_cri_is_unimplemented(fake_cri: FakeCri, client: ImageClient) -> None:
    fake_cri.version = None
    with pytest.raises(CriError) as caught:
        client.version()
    assert caught.value.code == "UNIMPLEMENTED"


def test_slow_server_hits_the_deadline(fake_cri: FakeCri, socket_path: str) -> None:
    fake_cri.hang = threading.Event()
    with CriClient(socket_path, timeout=0.2) as cri, pytest.raises(CriError) as caught:
        cri.version()
    assert caught.value.code == "DEADLINE_EXCEEDED"


def test_per_call_timeout_overrides_the_default(fake_cri: FakeCri, client: ImageClient) -> None:
    fake_cri.hang = threading.Event()
    with pytest.raises(CriError) as caught:
        client.pull_image("a/b:c", timeout=0.2)
    assert caught.value.code == "DEADLINE_EXCEEDED"


def test_malformed_reply_is_an_internal_error(fake_cri: FakeCri, client: ImageClient) -> None:
    fake_cri.reply_garbage = True
    with pytest.raises(CriError) as caught:
        client.version()
    assert caught.value.code == "INTERNAL"
    assert isinstance(caught.value.__cause__, ProtoDecodeError)


def test_relative_socket_path(
    fake_cri: FakeCri, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with CriClient("cri.sock") as cri:
        assert cri.version() == CONTAINERD_VERSION
