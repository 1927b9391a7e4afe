"""The credential leak audit (RELIABILITY.md): a known canary credential, and a `LeakAudit`
that fails a test when that credential shows up anywhere it must not.

Where the canary may appear: the credential sources the test feeds the agent, the two node
files and the agent's state dir. Everywhere else it is a leak:

* every log record of any logger that reaches handler dispatch (so replacing the root
  handlers, as `configure_logging` does, hides nothing), with its exception text;
* stdout and stderr (fd level with `capfd`; `capsys` when the test uses that instead), which
  covers CLI output, the redacted `--dry-run` diff and the one-line error of `main`;
* the message of every `NodeAgentError` and `FormatError` created during the test, raised or
  not, with the causes of any exception handed to `check_exception`;
* the text exposition of every `AgentMetrics` registry created during the test;
* the Events in the test API server, when the test uses the `kube_api` fixture;
* every regular file under `tmp_path` (and under any directory passed to `watch_dir`) except
  the allowed ones.

It also checks modes: a registered state dir is 0700, its `owned.json` 0600, and a
registered node file that holds the canary has no group or other bits (0600 or stricter).

Use it through the `leak_audit` fixture (tests/conftest.py). Read captured output through
`read_output()`, not `capfd.readouterr()`: what the test consumes itself the audit cannot see.
"""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from support.dockerconfig import basic_auth

from node_agent.errors import NodeAgentError
from node_agent.ownership import STATE_FILE
from node_agent.targets import FormatError

CANARY_USERNAME = "canary-puller"
CANARY_PASSWORD = "Canary-Pa55-q7Zr2xW9"  # ASCII only: JSON and TOML escaping leave it as is
#: The docker config `auth` form of the canary, without padding (so a padded copy matches).
CANARY_TOKEN = basic_auth(CANARY_USERNAME, CANARY_PASSWORD).rstrip("=")
CANARY_FORMS = (CANARY_PASSWORD, CANARY_TOKEN)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_CONTEXT_CHARS = 60


@dataclass(frozen=True)
class Output:
    """What the program under test printed since the last read."""

    out: str
    err: str


class _Capture(Protocol):
    def readouterr(self) -> Any: ...


@dataclass(frozen=True)
class _GuardedNode:
    files: tuple[Path, ...]
    state_dir: Path | None

    def allowed_paths(self) -> set[Path]:
        paths = {path.absolute() for path in self.files}
        for path in self.files:
            with suppress(OSError, RuntimeError):  # RuntimeError: a symlink loop
                paths.add(path.resolve())
        if self.state_dir is not None:
            paths.add(self.state_dir.absolute())
        return paths


@dataclass
class LeakAudit:
    """Collects what the program under test exposed and fails on any canary in it."""

    root: Path
    capture: _Capture | None = None
    kube_api: Callable[[], Any] | None = None
    allowed: set[Path] = field(default_factory=set)
    watched_dirs: list[Path] = field(default_factory=list)
    nodes: list[_GuardedNode] = field(default_factory=list)
    log_records: list[logging.LogRecord] = field(default_factory=list)
    errors_created: list[BaseException] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)

    # --- what the test declares --------------------------------------------------------------

    def allow(self, *paths: Path) -> None:
        """Files (or whole directories) where the canary belongs: credential sources."""
        self.allowed.update(path.absolute() for path in paths)

    def guard_node(self, *, files: Iterable[Path], state_dir: Path | None = None) -> _GuardedNode:
        """The node files and state dir the agent manages: the canary may be there, and the
        audit checks their modes. A symlinked node file is followed (the file it names is
        what holds the credential)."""
        files = tuple(files)
        node = _GuardedNode(files, state_dir)
        self.nodes.append(node)
        self.allowed.update(node.allowed_paths())
        return node

    def release(self, node: _GuardedNode, *sources: Path) -> None:
        """Check a node's modes now and stop watching it (before its files are deleted)."""
        self._check_node(node)
        self.nodes.remove(node)
        self.allowed.difference_update(node.allowed_paths())
        self.allowed.difference_update(source.absolute() for source in sources)

    def watch_dir(self, directory: Path) -> None:
        """Also scan `directory` (outside `tmp_path`, e.g. a short /tmp dir for sockets)."""
        self.watched_dirs.append(directory)

    # --- checks a test can run at any point ------------------------------------------------

    def check_text(self, text: str | bytes, where: str) -> None:
        """Record a leak if `text` holds the canary in any form."""
        data = text.encode("utf-8", "replace") if isinstance(text, str) else text
        for form in CANARY_FORMS:
            index = data.find(form.encode())
            if index != -1:
                start = max(0, index - _CONTEXT_CHARS)
                context = data[start : index + len(form) + _CONTEXT_CHARS].decode(
                    "utf-8", "replace"
                )
                for secret in CANARY_FORMS:
                    context = context.replace(secret, "<CANARY>")
                self.leaks.append(f"{where}: ...{context}...")

    def check_exception(self, error: BaseException) -> None:
        """An exception the test caught: its message, args and every cause and context."""
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            self.check_text(f"{current!s} {current.args!r}", f"exception {type(current).__name__}")
            current = current.__cause__ or current.__context__

    def read_output(self) -> Output:
        """stdout/stderr captured since the last read, checked for the canary."""
        if self.capture is None:
            return Output("", "")
        captured = self.capture.readouterr()
        output = Output(captured.out, captured.err)
        self.check_text(output.out, "stdout")
        self.check_text(output.err, "stderr")
        return output

    def check_tree(self, directory: Path) -> None:
        """Every regular file below `directory` that is not allowed."""
        for path in _regular_files(directory):
            if not self._is_allowed(path):
                self.check_text(path.read_bytes(), f"file {path}")

    def check_modes(self) -> None:
        for node in self.nodes:
            self._check_node(node)

    def _check_node(self, node: _GuardedNode) -> None:
        for path in node.files:
            self._check_node_file_mode(path)
        if node.state_dir is not None:
            self._check_state_dir_mode(node.state_dir)

    def assert_clean(self) -> None:
        """Fail now if anything leaked so far (the fixture also does this at teardown)."""
        if self.leaks:
            listed = "\n  ".join(self.leaks)
            self.leaks = []
            pytest.fail(f"credential leak audit: canary found\n  {listed}", pytrace=False)

    # --- the fixture's side ------------------------------------------------------------------

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Start recording log records, created errors and metrics registries."""
        call_handlers = logging.Logger.callHandlers
        records = self.log_records

        def recording_call_handlers(logger: logging.Logger, record: logging.LogRecord) -> None:
            records.append(record)
            call_handlers(logger, record)

        monkeypatch.setattr(logging.Logger, "callHandlers", recording_call_handlers)
        for error_type in (NodeAgentError, FormatError):
            monkeypatch.setattr(error_type, "__init__", self._recording_init(error_type))
        self._record_metrics(monkeypatch)

    def finish(self) -> None:
        """Teardown: check everything collected, then fail with every leak found."""
        self.read_output()
        formatter = logging.Formatter()
        for record in self.log_records:
            text = record.getMessage()
            if record.exc_info:
                text += formatter.formatException(record.exc_info)
            self.check_text(text, f"log record {record.name}")
        for error in self.errors_created:
            self.check_text(f"{error!s} {error.args!r}", f"{type(error).__name__} message")
        for metrics in self.metrics:
            self.check_text(_exposition(metrics), "metrics")
        if self.kube_api is not None:
            self.check_text(json.dumps(self.kube_api(), default=str), "Kubernetes Events")
        for directory in (self.root, *self.watched_dirs):
            self.check_tree(directory)
        self.check_modes()
        self.assert_clean()

    def _recording_init(self, error_type: type[Exception]) -> Callable[..., None]:
        original = error_type.__init__
        created = self.errors_created

        def recording_init(error: Exception, *args: Any, **kwargs: Any) -> None:
            created.append(error)
            original(error, *args, **kwargs)

        return recording_init

    def _record_metrics(self, monkeypatch: pytest.MonkeyPatch) -> None:
        try:
            from node_agent.metrics import AgentMetrics
        except ImportError:
            return
        original = AgentMetrics.__init__
        created = self.metrics

        def recording_init(metrics: AgentMetrics, *args: Any, **kwargs: Any) -> None:
            original(metrics, *args, **kwargs)
            created.append(metrics)

        monkeypatch.setattr(AgentMetrics, "__init__", recording_init)

    def _is_allowed(self, path: Path) -> bool:
        absolute = path.absolute()
        return any(absolute == allowed or allowed in absolute.parents for allowed in self.allowed)

    def _check_node_file_mode(self, path: Path) -> None:
        try:
            info = path.stat()
            # Only a regular file is opened: a FIFO would block.
            holds_canary = stat.S_ISREG(info.st_mode) and any(
                form.encode() in path.read_bytes() for form in CANARY_FORMS
            )
        except (OSError, RuntimeError):
            return  # absent, a dangling link or a loop: nothing holds the credential
        if holds_canary and stat.S_IMODE(info.st_mode) & 0o077:
            self.leaks.append(
                f"mode: {path} holds the credential with mode {stat.S_IMODE(info.st_mode):o}"
            )

    def _check_state_dir_mode(self, state_dir: Path) -> None:
        if not state_dir.is_dir():
            return
        mode = stat.S_IMODE(state_dir.stat().st_mode)
        if mode != PRIVATE_DIR_MODE:
            self.leaks.append(f"mode: state dir {state_dir} is {mode:o}, expected 700")
        state_file = state_dir / STATE_FILE
        if state_file.is_file():
            mode = stat.S_IMODE(state_file.stat().st_mode)
            if mode != PRIVATE_FILE_MODE:
                self.leaks.append(f"mode: {state_file} is {mode:o}, expected 600")


def _regular_files(directory: Path) -> Iterator[Path]:
    if not directory.is_dir():
        return
    for path in sorted(directory.rglob("*")):
        with suppress(OSError):
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def _exposition(metrics: Any) -> bytes:
    from prometheus_client import generate_latest

    exposition: bytes = generate_latest(metrics.registry)
    return exposition


def start_audit(request: pytest.FixtureRequest, root: Path) -> LeakAudit:
    """A `LeakAudit` for the running test: output through `capsys` if the test uses it, else
    `capfd`; Events from `kube_api` if the test uses it."""
    capture_name = "capsys" if "capsys" in request.fixturenames else "capfd"
    audit = LeakAudit(root=root, capture=request.getfixturevalue(capture_name))
    if "kube_api" in request.fixturenames:
        server = request.getfixturevalue("kube_api")
        audit.kube_api = server.events
    audit.install(request.getfixturevalue("monkeypatch"))
    return audit
