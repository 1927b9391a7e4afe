"""A real containerd (the Debian package, 1.6 on bookworm) run as root inside a temp dir.

The config is ``containerd config default`` with every path that would touch the machine's
containerd moved under one short temp dir: ``root``, ``state``, the grpc, ttrpc and debug
sockets, the ``opt`` plugin path and the CRI's CNI dirs (containerd 1.6 creates the CNI conf
dir if it is missing). Everything else stays at its default, including the empty
``registry.configs`` table, so node-agent edits a realistic file.

containerd is always started and stopped by a generated shell script (``containerd_ctl.sh``):
the fixture uses it, and its ``restart`` is the command node-agent runs with
``--reload command``. So the fixture and the agent restart containerd the same way, and the pid
file written by the script is the one source of truth for which process is ours.

Pulls work without touching /run/containerd; running containers would not (shim sockets live
under containerd's compiled-in /run/containerd/s), so these tests only pull images.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import tomlkit

from integration.processes import HarnessError, log_tail, pid_cmdline, pid_is_alive, wait_until
from node_agent.cri import CriClient, CriError

_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))
from cri_images import ImageClient  # noqa: E402

CONTAINERD_BINARY = "/usr/bin/containerd"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
_CTL_TEMPLATE = Path(__file__).with_name("containerd_ctl.sh")
_CRI_READY_TIMEOUT = 30.0
# A unix socket path must fit sockaddr_un.sun_path (108 bytes with the trailing NUL);
# containerd also derives "<grpc address>.ttrpc" from it.
_MAX_SOCKET_PATH = 100


def default_config_text() -> str:
    """What this containerd writes for ``containerd config default``."""
    result = subprocess.run(
        [CONTAINERD_BINARY, "config", "default"], capture_output=True, text=True, check=True
    )
    return result.stdout


def isolated_config(default_text: str, *, workdir: Path, snapshotter: str) -> str:
    """``default_text`` with every machine path moved under ``workdir``; the rest untouched."""
    document = tomlkit.parse(default_text)
    document["root"] = str(workdir / "root")
    document["state"] = str(workdir / "state")
    _table(document, "grpc")["address"] = str(workdir / "c.sock")
    _table(document, "ttrpc")["address"] = str(workdir / "c.sock.ttrpc")
    _table(document, "debug")["address"] = str(workdir / "debug.sock")
    plugins = _table(document, "plugins")
    _table(plugins, "io.containerd.internal.v1.opt")["path"] = str(workdir / "opt")
    cri = _table(plugins, CRI_PLUGIN)
    cni = _table(cri, "cni")
    cni["bin_dir"] = str(workdir / "cni" / "bin")
    cni["conf_dir"] = str(workdir / "cni" / "net.d")
    _table(cri, "containerd")["snapshotter"] = snapshotter
    return tomlkit.dumps(document)


def _table(container: tomlkit.TOMLDocument | tomlkit.items.Table, key: str) -> tomlkit.items.Table:
    table = container[key]
    if not isinstance(table, tomlkit.items.Table):
        raise HarnessError(f"containerd default config: {key} is not a table")
    return table


def overlayfs_works(probe_dir: Path) -> bool:
    """Whether an overlay mount succeeds here (it may not inside some containers)."""
    layers = {name: probe_dir / name for name in ("lower", "upper", "work", "merged")}
    for path in layers.values():
        path.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}"
    mounted = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(layers["merged"])],
        capture_output=True,
        check=False,
    )
    if mounted.returncode == 0:
        subprocess.run(["umount", str(layers["merged"])], check=True)
    shutil.rmtree(probe_dir)
    return mounted.returncode == 0


def render_ctl_script(*, config: Path, pidfile: Path, log: Path, socket: Path, flag: Path) -> str:
    """The control script with this containerd's paths filled in (shell-quoted)."""
    values = {
        "CONFIG": config,
        "PIDFILE": pidfile,
        "LOG": log,
        "SOCKET": socket,
        "BREAK_FLAG": flag,
    }
    text = _CTL_TEMPLATE.read_text()
    for name, path in values.items():
        text = text.replace(f"@{name}@", shlex.quote(str(path)))
    return text


class ContainerdNode:
    """One test containerd. Create with :meth:`create`, always finish with :meth:`destroy`.

    Attributes a test uses:
      ``config_path``      the config.toml containerd reads (edit it, then :meth:`restart`).
      ``socket_path``      the grpc socket; CRI is served on it.
      ``restart_command``  a shell command string that restarts this containerd, for
                           ``node-agent reconcile --reload command --reload-command CMD``.
                           It returns once the socket is back (like systemd's notify), without
                           waiting for CRI. See :meth:`break_next_restart`.
      ``snapshotter``      ``overlayfs`` when overlay mounts work here, else ``native``.
      ``log_path``         containerd's log (stdout and stderr, appended across restarts).
    """

    def __init__(self, workdir: Path, *, snapshotter: str) -> None:
        self.workdir = workdir
        self.snapshotter = snapshotter
        self.config_path = workdir / "config.toml"
        self.socket_path = workdir / "c.sock"
        self.log_path = workdir / "containerd.log"
        self.pid_path = workdir / "containerd.pid"
        self.break_flag_path = workdir / "break-next-restart"
        self.ctl_path = workdir / "ctl.sh"
        self.restart_command = f"{shlex.quote(str(self.ctl_path))} restart"

    @classmethod
    def create(cls, *, snapshotter: str | None = None) -> ContainerdNode:
        """Make the temp dir, pick the snapshotter, write config.toml and the control script.

        The dir is a short one under /tmp (pytest's tmp_path can exceed the socket path limit).
        ``snapshotter=None`` means overlayfs when an overlay mount works here, else native.
        Nothing is started yet.
        """
        workdir = Path(tempfile.mkdtemp(prefix="na-ctd-", dir="/tmp"))
        if snapshotter is None:
            works = overlayfs_works(workdir / "overlay-probe")
            snapshotter = "overlayfs" if works else "native"
        node = cls(workdir, snapshotter=snapshotter)
        if len(str(node.socket_path) + ".ttrpc") > _MAX_SOCKET_PATH:
            raise HarnessError(f"socket path too long for a unix socket: {node.socket_path}")
        config = isolated_config(default_config_text(), workdir=workdir, snapshotter=snapshotter)
        node.config_path.write_text(config)
        node._write_ctl_script()
        return node

    def start(self) -> float:
        """Start containerd and wait until CRI answers ``Version``; returns the seconds taken."""
        began = time.monotonic()
        self._ctl("start")
        self.wait_cri_ready()
        return time.monotonic() - began

    def stop(self) -> None:
        """Graceful stop (SIGTERM; SIGKILL after 10 s). Idempotent."""
        self._ctl("stop")

    def restart(self) -> float:
        """Stop, start with the same config, wait for CRI; returns the seconds taken.

        Unlike :attr:`restart_command`, this ignores :meth:`break_next_restart`'s flag.
        """
        began = time.monotonic()
        self._ctl("stop")
        self._ctl("start")
        self.wait_cri_ready()
        return time.monotonic() - began

    def pid(self) -> int | None:
        """The pid of our containerd when it runs, else None."""
        try:
            pid = int(self.pid_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        alive = pid_is_alive(pid) and str(self.config_path) in pid_cmdline(pid)
        return pid if alive else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def cri_ready(self) -> bool:
        """True when CRI answers ``Version`` on the socket right now."""
        try:
            with CriClient(str(self.socket_path), timeout=1.0) as client:
                client.version()
        except CriError:
            return False
        return True

    def wait_cri_ready(self, timeout: float = _CRI_READY_TIMEOUT) -> None:
        """Wait until CRI answers; raises :class:`HarnessError` with the log tail if it does not."""
        if not wait_until(self.cri_ready, timeout=timeout, interval=0.1):
            state = "running" if self.is_running() else "not running"
            raise HarnessError(f"CRI not ready ({state}):\n{log_tail(self.log_path)}")

    def cri(self, *, timeout: float = 30.0) -> ImageClient:
        """A CRI client for this containerd; use it as a context manager."""
        return ImageClient(str(self.socket_path), timeout=timeout)

    def break_next_restart(self, *, exit_code: int = 0) -> None:
        """Make the next run of :attr:`restart_command` stop containerd and exit ``exit_code``.

        containerd stays dead; the run after that restarts it properly again. ``exit_code=0``
        is a restart that "succeeds" but leaves no runtime (only a CRI health check notices).
        """
        self.break_flag_path.write_text(f"{exit_code}\n")

    def destroy(self, *, keep_log_in: Path | None = None) -> None:
        """Stop containerd, unmount leftovers and delete the temp dir.

        ``keep_log_in``: copy containerd's log there first (pytest's tmp_path survives the run).
        """
        try:
            self.stop()
        finally:
            if keep_log_in is not None and self.log_path.exists():
                shutil.copy(self.log_path, keep_log_in / "containerd.log")
            _unmount_below(self.workdir)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _ctl(self, action: str) -> None:
        result = subprocess.run(
            [str(self.ctl_path), action], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise HarnessError(
                f"ctl.sh {action} failed ({result.returncode}): {result.stderr.strip()}\n"
                f"{log_tail(self.log_path)}"
            )

    def _write_ctl_script(self) -> None:
        self.ctl_path.write_text(
            render_ctl_script(
                config=self.config_path,
                pidfile=self.pid_path,
                log=self.log_path,
                socket=self.socket_path,
                flag=self.break_flag_path,
            )
        )
        self.ctl_path.chmod(0o755)


def _unmount_below(directory: Path) -> None:
    """Lazily unmount anything containerd left mounted under ``directory``, deepest first."""
    prefix = str(directory) + "/"
    mount_points = [
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    for mount_point in sorted((m for m in mount_points if m.startswith(prefix)), reverse=True):
        with suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", mount_point], check=True, capture_output=True)
