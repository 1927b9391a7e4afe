"""The CRI image calls the tests make against containerd (the agent itself only asks
`Version`): PullImage, RemoveImage, ImageStatus, over `node_agent.cri`'s client and codec."""

from dataclasses import dataclass, field

from node_agent.cri import (
    CriClient,
    decode_message,
    decoded,
    encode_len_field,
    encode_string_field,
    last_bytes,
    last_string,
)

PULL_IMAGE_METHOD = "/runtime.v1.ImageService/PullImage"
REMOVE_IMAGE_METHOD = "/runtime.v1.ImageService/RemoveImage"
IMAGE_STATUS_METHOD = "/runtime.v1.ImageService/ImageStatus"


@dataclass(frozen=True)
class AuthConfig:
    """``AuthConfig`` sent with a pull. Values never appear in ``repr``; empty means unset."""

    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    """base64 of ``user:password``."""
    identity_token: str = field(default="", repr=False)

    def secret_values(self) -> tuple[str, ...]:
        """Every non-empty value, for scrubbing them out of error messages."""
        values = (self.username, self.password, self.auth, self.identity_token)
        return tuple(value for value in values if value)


def encode_image_spec(image: str) -> bytes:
    return encode_string_field(1, image)


def encode_auth_config(auth: AuthConfig) -> bytes:
    return b"".join(
        (
            encode_string_field(1, auth.username),
            encode_string_field(2, auth.password),
            encode_string_field(3, auth.auth),
            encode_string_field(5, auth.identity_token),
        )
    )


def decode_auth_config(data: bytes) -> AuthConfig:
    fields = decode_message(data)
    return AuthConfig(
        username=last_string(fields, 1),
        password=last_string(fields, 2),
        auth=last_string(fields, 3),
        identity_token=last_string(fields, 5),
    )


def encode_pull_image_request(image: str, auth: AuthConfig | None) -> bytes:
    """``auth=None`` leaves field 2 out entirely: then containerd uses its ``configs.auth``."""
    request = encode_len_field(1, encode_image_spec(image))
    if auth is not None:
        request += encode_len_field(2, encode_auth_config(auth))
    return request


def decode_pull_image_response(data: bytes) -> str:
    return last_string(decode_message(data), 1)


def encode_remove_image_request(image: str) -> bytes:
    return encode_len_field(1, encode_image_spec(image))


def encode_image_status_request(image: str) -> bytes:
    # verbose (field 2) stays false, its default, so it is not sent.
    return encode_len_field(1, encode_image_spec(image))


def decode_image_status_response(data: bytes) -> bool:
    """True when the response carries an ``image`` (field 1): the runtime has the image."""
    return last_bytes(decode_message(data), 1) is not None


class ImageClient(CriClient):
    """`CriClient` plus the image calls."""

    def pull_image(
        self, image: str, *, auth: AuthConfig | None = None, timeout: float | None = None
    ) -> str:
        """Pull ``image``; returns the image ref. ``timeout`` overrides the client's default.

        With ``auth=None`` the request carries no credentials, the case in which containerd
        falls back to the ``configs.auth`` node-agent writes.
        """
        secrets = auth.secret_values() if auth is not None else ()
        request = encode_pull_image_request(image, auth)
        reply = self.call(PULL_IMAGE_METHOD, request, timeout=timeout, secrets=secrets)
        return decoded(PULL_IMAGE_METHOD, decode_pull_image_response, reply)

    def remove_image(self, image: str) -> None:
        self.call(REMOVE_IMAGE_METHOD, encode_remove_image_request(image))

    def image_present(self, image: str) -> bool:
        reply = self.call(IMAGE_STATUS_METHOD, encode_image_status_request(image))
        return decoded(IMAGE_STATUS_METHOD, decode_image_status_response, reply)
