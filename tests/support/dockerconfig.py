"""Registry credentials as the agent reads them: docker config documents (`docker_config`)
and the data of a `kubernetes.io/dockerconfigjson` Secret carrying one (`secret_data`)."""

import base64
import json

DOCKERCONFIG = "kubernetes.io/dockerconfigjson"
"""The Secret type."""


def login(password: str, *, username: str = "puller") -> dict[str, str]:
    """One registry's entry in a docker config."""
    return {"username": username, "password": password}


def basic_auth(username: str, password: str) -> str:
    """The `auth` field of a docker config entry: base64 of `username:password`."""
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def docker_config(auths: object) -> bytes:
    """A `.dockerconfigjson` document: `{"auths": auths}` (entries by registry)."""
    return json.dumps({"auths": auths}).encode()


def secret_data(auths: object) -> dict[str, bytes]:
    """The data of a dockerconfigjson Secret holding `auths`."""
    return {".dockerconfigjson": docker_config(auths)}


def document_data(document: object) -> dict[str, bytes]:
    """The data of a dockerconfigjson Secret holding any JSON `document`, valid or not."""
    return {".dockerconfigjson": json.dumps(document).encode()}


def registry_login(registry: str, password: str, *, username: str = "puller") -> dict[str, bytes]:
    """The data of a dockerconfigjson Secret with one login for `registry`."""
    return secret_data({registry: login(password, username=username)})
