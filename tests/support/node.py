"""A node's files under one directory (`NodeTree`): containerd's config.toml, kubelet's
config.json, the agent's state dir, a Secret file and a restart log, with foreign content the
agent must keep."""

from __future__ import annotations

import base64
import json
import stat
import tomllib
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from support.dockerconfig import docker_config

CRI = "io.containerd.grpc.v1.cri"
REGISTRY = "reg.example:5000"
"""The registry the daemon tests' Secret names."""

FOREIGN_TOML = f"""# Written by the node image. The agent must keep every byte it does not own.
version = 2
root = "/var/lib/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]

  [plugins."{CRI}"]
    sandbox_image = "registry.k8s.io/pause:3.9"

    [plugins."{CRI}".containerd]
      snapshotter = "overlayfs"

    [plugins."{CRI}".registry]
      config_path = "/etc/containerd/certs.d"

      [plugins."{CRI}".registry.configs]

        # a login someone made by hand
        [plugins."{CRI}".registry.configs."foreign.example".auth]
          username = "theirs"
          password = "their-password"

        [plugins."{CRI}".registry.configs."tls-only.example".tls]
          insecure_skip_verify = true
"""
FOREIGN_JSON = """{
  "auths": {
    "https://index.docker.io/v1/": {
      "auth": "aHViLXVzZXI6aHViLXBhc3M="
    },
    "quay.io": {
      "auth": "cTpx"
    }
  },
  "HttpHeaders": {
    "User-Agent": "Docker-Client/24.0"
  }
}
"""
#: Registry entries present before the agent, as each file holds them.
FOREIGN_TOML_AUTHS = {"foreign.example": {"username": "theirs", "password": "their-password"}}
FOREIGN_JSON_AUTHS = {
    "https://index.docker.io/v1/": {"auth": "aHViLXVzZXI6aHViLXBhc3M="},
    "quay.io": {"auth": "cTpx"},
}


MINIMAL_FOREIGN_TOML = f"""# node image config
version = 2

[plugins."{CRI}".registry.configs."foreign.example".auth]
  username = "theirs"
  password = "their-password"
"""
MINIMAL_FOREIGN_JSON = '{\n  "auths": {\n    "quay.io": {\n      "auth": "cTpx"\n    }\n  }\n}\n'
"""One foreign entry in each file (foreign.example, quay.io) and nothing around it."""


@dataclass(frozen=True)
class NodeTree:
    """A node's two files and the agent's state dir under one directory, plus the Secret."""

    root: Path

    @property
    def config_toml(self) -> Path:
        return self.root / "etc/containerd/config.toml"

    @property
    def config_json(self) -> Path:
        return self.root / "var/lib/kubelet/config.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/node-agent"

    @property
    def secret(self) -> Path:
        return self.root / "secret/config.json"

    @property
    def targets(self) -> tuple[Path, Path]:
        return self.config_toml, self.config_json

    @classmethod
    def create(
        cls, root: Path, *, toml: str | None = FOREIGN_TOML, json_text: str | None = FOREIGN_JSON
    ) -> Self:
        node = cls(root)
        for path, text in ((node.config_toml, toml), (node.config_json, json_text)):
            path.parent.mkdir(parents=True, exist_ok=True)
            if text is not None:
                path.write_text(text)
        node.secret.parent.mkdir(parents=True, exist_ok=True)
        return node

    def write_secret(self, auths: dict[str, dict[str, str]]) -> None:
        self.secret.write_bytes(docker_config(auths))

    def write_secret_bytes(self, payload: bytes) -> None:
        self.secret.write_bytes(payload)

    def flags(self, *extra: str) -> list[str]:
        """`reconcile` flags for this tree (`--reload none` unless `extra` has a `--reload`)."""
        reload = [] if "--reload" in extra else ["--reload", "none"]
        return [
            "--secret-file",
            str(self.secret),
            "--containerd-config",
            str(self.config_toml),
            "--kubelet-config",
            str(self.config_json),
            "--state-dir",
            str(self.state_dir),
            *reload,
            *extra,
        ]

    @property
    def restart_log(self) -> Path:
        """Where `RESTART_SCRIPT` (support.settings) logs the restarts it ran."""
        return self.root / "restarts.log"

    def restart_times(self) -> list[float]:
        """Wall-clock time of each successful restart."""
        if not self.restart_log.exists():
            return []
        return [float(line) for line in self.restart_log.read_text().split()]

    def restarts(self) -> int:
        return len(self.restart_times())

    def restart_attempts(self) -> list[float]:
        """Wall-clock start of every restart attempt, failed ones included."""
        starts = self.restart_log.with_name(self.restart_log.name + ".start")
        return [float(line) for line in starts.read_text().split()] if starts.exists() else []

    def containerd_password(self, registry: str = REGISTRY) -> str | None:
        """The password of `registry`'s auth in config.toml (None: no entry, no file)."""
        if not self.config_toml.exists():
            return None
        configs = tomllib.loads(self.config_toml.read_text())["plugins"][CRI]["registry"]["configs"]
        auth = configs.get(registry, {}).get("auth")
        return None if auth is None else str(auth["password"])

    def kubelet_password(self, registry: str = REGISTRY) -> str | None:
        """The password in `registry`'s auth in config.json (None: no entry, no file)."""
        if not self.config_json.exists():
            return None
        entry = json.loads(self.config_json.read_text())["auths"].get(registry)
        if entry is None:
            return None
        return base64.b64decode(entry["auth"]).decode().partition(":")[2]

    def passwords(self) -> tuple[str | None, str | None]:
        """`REGISTRY`'s password in config.toml and in config.json."""
        return self.containerd_password(), self.kubelet_password()

    def contents(self) -> dict[str, bytes | None]:
        """Both node files and owned.json as bytes (None: absent)."""
        return {
            "config.toml": _read_or_none(self.config_toml),
            "config.json": _read_or_none(self.config_json),
            "owned.json": _read_or_none(self.state_dir / "owned.json"),
        }

    def temp_files(self) -> list[Path]:
        """Leftover temp files of the agent beside the node files and in the state dir."""
        directories = {self.config_toml.parent, self.config_json.parent, self.state_dir}
        for target in self.targets:
            if target.is_symlink():
                with suppress(OSError, RuntimeError):  # RuntimeError: a loop
                    directories.add(target.resolve().parent)
        return sorted(
            path
            for directory in directories
            if directory.is_dir()
            for path in directory.iterdir()
            if ".node-agent-" in path.name
        )


def _read_or_none(path: Path) -> bytes | None:
    """The file's bytes; None when absent. Never opens anything but a regular file (a FIFO
    would block): other kinds read as a marker such as `<not a regular file: 10644>`."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as error:  # a symlink loop
        return f"<{error.strerror}>".encode()
    if not stat.S_ISREG(mode):
        return f"<not a regular file: {mode:o}>".encode()
    return path.read_bytes()
