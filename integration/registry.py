"""A real Docker registry (Debian's ``docker-registry``, distribution 2.8) with htpasswd auth.

The registry listens on 127.0.0.1 only, keeps its storage under a temp dir, and accepts one
user with HTTP Basic auth (the htpasswd access controller answers ``401`` with
``WWW-Authenticate: Basic realm=...``; no token server is involved).

Measured here (distribution 2.8.2): the registry re-reads the htpasswd file when its mtime
changes, so a password rotation needs no restart. :meth:`AuthRegistry.rotate_password` still
verifies that the new password is accepted and restarts the registry (same port, same storage)
if it is not, so the fixture keeps working should a registry version load the file only once.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from integration.processes import LOOPBACK, HarnessError, free_loopback_port, log_tail, wait_until

REGISTRY_BINARY = "/usr/bin/docker-registry"
REALM = "node-agent-integration"
_START_TIMEOUT = 15.0
_ROTATION_TIMEOUT = 3.0
_STOP_TIMEOUT = 10.0

# urllib honours http_proxy/HTTP_PROXY; an empty ProxyHandler keeps every request on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class HttpReply:
    """One HTTP answer. ``headers`` keys are lower-case."""

    status: int
    headers: dict[str, str]
    body: bytes


def basic_auth_header(username: str, password: str) -> dict[str, str]:
    """The ``Authorization`` header for HTTP Basic auth."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def http_request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> HttpReply:
    """Send one request to a loopback URL; 4xx/5xx answers are returned, not raised."""
    if urllib.parse.urlsplit(url).hostname != LOOPBACK:
        raise HarnessError(f"refusing to send test traffic off loopback: {url}")
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return _reply(response.status, response.headers.items(), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return _reply(error.code, error.headers.items(), error.read())


def _reply(status: int, headers: list[tuple[str, str]], body: bytes) -> HttpReply:
    return HttpReply(status, {name.lower(): value for name, value in headers}, body)


def htpasswd_line(username: str, password: str) -> str:
    """One bcrypt htpasswd entry (the registry accepts bcrypt only).

    The password goes through stdin (``-i``), so it never shows in a process listing.
    """
    result = subprocess.run(
        ["htpasswd", "-B", "-i", "-n", username],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip() + "\n"


def registry_config(*, port: int, storage: Path, htpasswd: Path) -> dict[str, object]:
    """The registry's config.yml as a mapping: loopback listener, filesystem storage, Basic auth."""
    return {
        "version": "0.1",
        "log": {"level": "info", "fields": {"service": "registry"}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        # A fixed secret keeps upload state valid across a restart of the same registry.
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": "node-agent-integration-only"},
        "auth": {"htpasswd": {"realm": REALM, "path": str(htpasswd)}},
    }


class AuthRegistry:
    """One ``docker-registry`` process on ``127.0.0.1:<port>`` that needs HTTP Basic auth.

    Attributes a test uses:
      ``host``      ``"127.0.0.1:PORT"`` — the registry key containerd and kubelet consult and
                    the prefix of image references (``f"{registry.host}/repo:tag"``).
      ``username``  the one user (fixed).
      ``password``  the current password; :meth:`rotate_password` changes it.
    """

    def __init__(self, *, workdir: Path, username: str = "tester", password: str = "first-pw"):
        self.workdir = workdir
        self.username = username
        self.password = password
        self.port = free_loopback_port()
        self.config_path = workdir / "config.yml"
        self.htpasswd_path = workdir / "htpasswd"
        self.storage_path = workdir / "storage"
        self.log_path = workdir / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of an API path such as ``/v2/``."""
        return f"http://{self.host}{path}"

    def auth_headers(self) -> dict[str, str]:
        """Basic auth headers with the current credentials."""
        return basic_auth_header(self.username, self.password)

    def start(self) -> float:
        """Write config and htpasswd, start the registry, wait for ``/v2/`` to answer 401.

        Returns the seconds it took. Raises :class:`HarnessError` (with the log tail) if the
        registry exits or does not answer in time.
        """
        began = time.monotonic()
        self.storage_path.mkdir(parents=True, exist_ok=True)
        self._write_htpasswd(self.password)
        config = registry_config(
            port=self.port, storage=self.storage_path, htpasswd=self.htpasswd_path
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn()
        if not wait_until(self._answers_unauthorized, timeout=_START_TIMEOUT):
            self.stop()
            raise HarnessError(f"registry did not answer 401 on /v2/:\n{log_tail(self.log_path)}")
        return time.monotonic() - began

    def stop(self) -> None:
        """SIGTERM the registry and wait for it; SIGKILL if it does not exit. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def accepts(self, username: str, password: str) -> bool:
        """True when ``GET /v2/`` with these Basic credentials answers 200."""
        reply = http_request("GET", self.url("/v2/"), headers=basic_auth_header(username, password))
        return reply.status == 200

    def rotate_password(self, new_password: str) -> None:
        """Replace the user's password; the old one stops working.

        The htpasswd file is replaced atomically and the registry picks it up by itself; if the
        new password is not accepted within a few seconds, the registry is restarted on the same
        port and storage. Either way, on return the new password works and the old one fails.
        """
        self._write_htpasswd(new_password)
        self.password = new_password
        if wait_until(lambda: self.accepts(self.username, new_password), timeout=_ROTATION_TIMEOUT):
            return
        self.stop()
        self.start()
        if not self.accepts(self.username, new_password):
            raise HarnessError("registry rejects the rotated password even after a restart")

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _answers_unauthorized(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            raise HarnessError(f"registry exited during start:\n{log_tail(self.log_path)}")
        try:
            reply = http_request("GET", self.url("/v2/"), timeout=1.0)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return reply.status == 401

    def _write_htpasswd(self, password: str) -> None:
        # Replace, never rewrite in place: the registry must not read a half-written file.
        temporary = self.htpasswd_path.with_name(self.htpasswd_path.name + ".tmp")
        temporary.write_text(htpasswd_line(self.username, password))
        os.replace(temporary, self.htpasswd_path)
