"""Command line: flags (each also `NODE_AGENT_<FLAG>`) → Settings → a command → exit code.

Exit codes: 0 done / in sync, 1 error, 2 usage, 3 `check` found differences.
"""

import argparse
import functools
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from node_agent import __version__, commands
from node_agent.demo import demo_command
from node_agent.errors import NodeAgentError, unexpected
from node_agent.escaping import printable
from node_agent.exit_codes import EXIT_ERROR, EXIT_USAGE
from node_agent.kube.model import ObjectRef
from node_agent.logs import configure_logging, fatal_json
from node_agent.settings import (
    ON_SECRET_DELETE,
    RESTART_MODES,
    TARGET_NAMES,
    DaemonSettings,
    RestartCoordination,
    Settings,
)
from node_agent.targets.credential_provider.response import valid_cache_duration

ENV_PREFIX = "NODE_AGENT_"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_MAX_RESTART_CONCURRENCY = 1000
_MAX_RECOVERY_RATE = 1000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# A namespace and a Secret name: DNS-1123 labels / subdomains.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SECRET_REF = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)/([a-z0-9]([-a-z0-9.]*[a-z0-9])?)$")


def parse_duration(text: str) -> float:
    """Seconds from `30s`, `200ms`, `5m`, `1h` or a plain number of seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 200ms, 5m)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_targets(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in TARGET_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--targets takes a comma-separated subset of {','.join(TARGET_NAMES)}"
        )
    return names


def parse_cache_duration(text: str) -> str:
    """A duration the kubelet parses (Go syntax: 0s, 90s, 5m, 1h30m), kept as text."""
    if not valid_cache_duration(text):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 0s, 30s, 5m, 1h)")
    return text


def parse_secret_ref(text: str) -> ObjectRef:
    """`NAMESPACE/NAME` of a Secret."""
    match = _SECRET_REF.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not NAMESPACE/NAME of a Secret: {text!r}")
    return ObjectRef(match.group(1), match.group(3))


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE | _FALSE:
        raise argparse.ArgumentTypeError(f"not true or false: {text!r}")
    return value in _TRUE


def parse_version(text: str) -> int:
    if text not in ("2", "3"):
        raise argparse.ArgumentTypeError("--containerd-config-version must be 2 or 3")
    return int(text)


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default in its help, when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if "%(default)" in help_text or default in (None, False, [], "", argparse.SUPPRESS):
            return help_text
        if action.option_strings and "default " not in help_text:
            return f"{help_text} (default: {_shown_default(action)})"
        return help_text


def _shown_default(action: argparse.Action) -> str:
    """A default as it would be typed: `containerd,kubelet`, `30s`."""
    default = action.default
    if action.type is parse_duration and isinstance(default, float):
        return f"{default:g}s"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


class _FlagTarget(Protocol):
    """Where flags go: a parser or one of its argument groups."""

    def add_argument(self, *names: str, **options: Any) -> argparse.Action: ...


class _EnvDefaults:
    """Adds flags whose default comes from `NODE_AGENT_<FLAG>` when that variable is set."""

    def __init__(self, parser: _FlagTarget, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.environ = environ

    def add(self, flag: str, **options: Any) -> None:
        env_name = ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")
        options["help"] = f"{options.get('help', '')} [env {env_name}]".strip()
        raw = self.environ.get(env_name)
        if raw is not None:
            options["default"] = self._from_env(raw, options)
        self.parser.add_argument(flag, **options)

    def add_durations(self, durations: Sequence[tuple[str, str, str]]) -> None:
        """Duration flags from (flag, default, help) rows."""
        for flag, default, help_text in durations:
            self.add(
                flag,
                type=parse_duration,
                default=parse_duration(default),
                metavar="DURATION",
                help=f"{help_text} (default {default})",
            )

    @staticmethod
    def _from_env(raw: str, options: Mapping[str, Any]) -> Any:
        action = options.get("action")
        if action == "store_true":
            return raw.strip().lower() in _TRUE
        convert = options.get("type", str)
        if action == "append":
            return [convert(item) for item in raw.split(",") if item.strip()]
        return convert(raw)


# The argument groups of `--help`, in order: (title, what the group's flags are about).
_GROUPS = {
    "sources": "where the credentials come from, highest priority first",
    "node files": "the node's files the agent manages, and where they are",
    "restarts": "how containerd is restarted after its auth changed, and proven healthy",
    "restart slots": "at most N nodes restart containerd at once (Leases in the API)",
    "API": "the Kubernetes API: how to reach it, Events on the Node",
    "stuck pods": "evicting this node's pods stuck on image pulls, once credentials are "
    "effective (off by default)",
    "observability": "logs, metrics and probes",
}


def _groups(
    parser: argparse.ArgumentParser, environ: Mapping[str, str], titles: Sequence[str]
) -> dict[str, _EnvDefaults]:
    """One flag adder per argument group, for the groups a command has (argparse would show
    an empty group's title)."""
    return {
        title: _EnvDefaults(parser.add_argument_group(title, description), environ)
        for title, description in _GROUPS.items()
        if title in titles
    }


def _add_file_source_flags(flags: _EnvDefaults) -> None:
    flags.add(
        "--secret-file",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="credentials source, repeatable, highest priority first (`reconcile` and "
        "`check` need one, or a --fallback-secret-file): a .dockerconfigjson or .dockercfg "
        "document, a Secret manifest, or a mounted Secret volume",
    )
    flags.add(
        "--fallback-secret-file",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="source used only for registries no --secret-file names",
    )


def _add_node_file_flags(flags: _EnvDefaults) -> None:
    defaults = Settings()
    flags.add(
        "--containerd-config",
        type=Path,
        default=defaults.containerd_config,
        metavar="PATH",
        help="containerd's config.toml (registry auth tables)",
    )
    flags.add(
        "--containerd-config-version",
        type=parse_version,
        default=2,
        help="version of a config.toml the agent has to create (2 or 3)",
    )
    flags.add(
        "--kubelet-config",
        type=Path,
        default=defaults.kubelet_config,
        metavar="PATH",
        help="the kubelet's docker config.json (auths)",
    )
    flags.add(
        "--targets",
        type=parse_targets,
        default=defaults.targets,
        help=f"which node files to manage, of {','.join(TARGET_NAMES)}",
    )
    flags.add(
        "--credential-provider-bin-dir",
        type=Path,
        default=defaults.credential_provider_bin_dir,
        metavar="DIR",
        help="the kubelet's --image-credential-provider-bin-dir (target credential-provider)",
    )
    flags.add(
        "--credential-provider-config",
        type=Path,
        default=defaults.credential_provider_config,
        metavar="PATH",
        help="the kubelet's --image-credential-provider-config (target credential-provider)",
    )
    flags.add(
        "--credential-provider-cache-duration",
        type=parse_cache_duration,
        default=defaults.credential_provider_cache_duration,
        metavar="DURATION",
        help="how long the kubelet may cache the plugin's answer; 0s: ask on every pull",
    )
    flags.add(
        "--credential-provider-match-images",
        choices=("registries", "all"),
        default=defaults.credential_provider_match_images,
        help="the images the kubelet asks the plugin about: those of the credentials' "
        "registries (a new registry waits for a kubelet restart), or all (it never does)",
    )
    flags.add(
        "--host-root",
        type=Path,
        default=defaults.host_root,
        metavar="DIR",
        help="where the node's filesystem is mounted; prefixes every node path",
    )
    flags.add(
        "--state-dir",
        type=Path,
        default=defaults.state_dir,
        metavar="DIR",
        help="where the agent remembers what it owns (owned.json); keep it across restarts",
    )


def _add_restart_flags(flags: _EnvDefaults) -> None:
    defaults = Settings()
    flags.add(
        "--reload",
        choices=RESTART_MODES,
        default=defaults.restart_mode,
        help="how to restart containerd after its auth changed",
    )
    flags.add(
        "--reload-command",
        default=None,
        metavar="'CMD ARGS'",
        help="restart command for --reload command",
    )
    flags.add(
        "--reload-timeout",
        type=parse_duration,
        default=defaults.restart_timeout,
        metavar="DURATION",
        help="restart + CRI health budget before rolling back",
    )
    flags.add(
        "--containerd-socket",
        type=Path,
        default=defaults.containerd_socket,
        metavar="PATH",
        help="containerd's socket, where CRI Version is asked (its version, and health after "
        "a restart)",
    )
    flags.add(
        "--system-bus-socket",
        type=Path,
        default=defaults.system_bus_socket,
        metavar="PATH",
        help="the node's D-Bus system bus, for --reload systemd",
    )
    flags.add(
        "--restart-trigger-dir",
        type=Path,
        default=defaults.restart_trigger_dir,
        metavar="DIR",
        help="node directory watched by the host's node-agent-restart-containerd.path unit, "
        "for --reload trigger",
    )


def _add_log_flags(flags: _EnvDefaults) -> None:
    flags.add(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr: text, or one JSON object per line",
    )
    flags.add(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the least severe log lines shown",
    )


def _add_node_flags(
    parser: argparse.ArgumentParser, environ: Mapping[str, str]
) -> dict[str, _EnvDefaults]:
    """The flags of `reconcile` and `check`; their groups, for a command's own flags."""
    groups = _groups(parser, environ, ("sources", "node files", "restarts", "observability"))
    _add_file_source_flags(groups["sources"])
    _add_node_file_flags(groups["node files"])
    _add_restart_flags(groups["restarts"])
    _add_log_flags(groups["observability"])
    return groups


def _add_daemon_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """The flags of `run`: those of `reconcile`, and the daemon's."""
    groups = _groups(parser, environ, tuple(_GROUPS))
    _add_file_source_flags(groups["sources"])
    _add_api_source_flags(groups["sources"])
    _add_node_file_flags(groups["node files"])
    _add_daemon_pass_flags(groups["node files"])
    _add_restart_flags(groups["restarts"])
    _add_restart_pacing_flags(groups["restarts"])
    _add_restart_slot_flags(groups["restart slots"], environ)
    _add_api_flags(groups["API"], environ)
    _add_stuck_pod_flags(groups["stuck pods"])
    _add_log_flags(groups["observability"])
    _add_metrics_flags(groups["observability"])


def _add_api_source_flags(flags: _EnvDefaults) -> None:
    defaults = DaemonSettings()
    flags.add(
        "--secret",
        action="append",
        type=parse_secret_ref,
        default=[],
        metavar="NAMESPACE/NAME",
        help="Secret read through the Kubernetes API, repeatable, highest priority first "
        "(above every --secret-file)",
    )
    flags.add(
        "--fallback-secret",
        action="append",
        type=parse_secret_ref,
        default=[],
        metavar="NAMESPACE/NAME",
        help="Secret used only for registries no higher source names",
    )
    flags.add(
        "--on-secret-delete",
        choices=ON_SECRET_DELETE,
        default=defaults.on_secret_delete,
        help="a Secret the API confirms deleted: remove its registries, or keep them",
    )
    durations = (
        ("--resync-interval", "5m", "full check of sources and node files this often"),
        ("--debounce", "200ms", "changes within this long after a pass join the next one"),
    )
    flags.add_durations(durations)


def _add_daemon_pass_flags(flags: _EnvDefaults) -> None:
    flags.add(
        "--dry-run", action="store_true", help="log what would change; write and restart nothing"
    )
    flags.add("--once", action="store_true", help="one pass, then exit (for debugging)")


def _add_restart_pacing_flags(flags: _EnvDefaults) -> None:
    flags.add_durations(
        (("--min-reload-interval", "30s", "at most one containerd restart this often"),)
    )


def _add_api_flags(flags: _EnvDefaults, environ: Mapping[str, str]) -> None:
    flags.add(
        "--kubeconfig",
        type=Path,
        default=None,
        metavar="PATH",
        help="how to reach the API (default: in-cluster ServiceAccount, else $KUBECONFIG)",
    )
    flags.add(
        "--node-name",
        default=environ.get("NODE_NAME") or None,
        help="this node's name, for Events and restart slots (also env NODE_NAME)",
    )
    flags.add(
        "--events",
        nargs="?",
        type=parse_bool,
        const=True,
        default=None,
        metavar="true|false",
        help="record Events on the Node (default: on when a --secret is given)",
    )
    flags.parser.add_argument(
        "--no-events",
        dest="events",
        action="store_false",
        help="record no Events (the default without API sources)",
    )


def _add_stuck_pod_flags(flags: _EnvDefaults) -> None:
    flags.add(
        "--recover-stuck-pods",
        action="store_true",
        help="once a registry's credentials are effective on this node, evict this node's "
        "pods stuck pulling from it (with a controller; the others get an Event); needs "
        "--secret and --node-name, and daemonset/stuck-pod-recovery's RBAC",
    )
    flags.add(
        "--recover-stuck-pods-rate",
        type=parse_rate,
        default=DaemonSettings().recover_stuck_pods_rate,
        metavar="N",
        help="at most N evictions a minute on this node",
    )


def _add_metrics_flags(flags: _EnvDefaults) -> None:
    flags.add(
        "--metrics-address",
        default=DaemonSettings().metrics_address,
        metavar="[HOST]:PORT",
        help="where /metrics, /healthz and /readyz are served",
    )


def _add_restart_slot_flags(flags: _EnvDefaults, environ: Mapping[str, str]) -> None:
    flags.add(
        "--restart-concurrency",
        type=parse_count,
        default=RestartCoordination().concurrency,
        metavar="N",
        help="at most N nodes restart containerd at once, through Leases "
        "node-agent-restart-<i>; 0: no coordination (default 1)",
    )
    durations = (
        ("--restart-lease-ttl", "60s", "a slot Lease unchanged this long is free again"),
        (
            "--restart-max-wait",
            "30m",
            "restart without a slot after the API was unreachable this long",
        ),
        ("--restart-settle", "5s", "keep the slot this long after a healthy restart"),
    )
    flags.add_durations(durations)
    flags.add(
        "--restart-lease-namespace",
        default=_own_namespace(environ),
        metavar="NAMESPACE",
        help="namespace of the slot Leases (default: the ServiceAccount's namespace, "
        "else env POD_NAMESPACE)",
    )


def parse_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) > _MAX_RESTART_CONCURRENCY:
        raise argparse.ArgumentTypeError(
            f"--restart-concurrency takes a whole number from 0 to {_MAX_RESTART_CONCURRENCY}: "
            f"{text!r}"
        )
    return int(text)


def parse_rate(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= _MAX_RECOVERY_RATE:
        raise argparse.ArgumentTypeError(
            f"--recover-stuck-pods-rate takes a whole number from 1 to {_MAX_RECOVERY_RATE}: "
            f"{text!r}"
        )
    return int(text)


def _own_namespace(environ: Mapping[str, str]) -> str | None:
    """The agent's namespace: the ServiceAccount mount, else `POD_NAMESPACE`."""
    try:
        namespace = SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
    except OSError:
        namespace = ""
    return namespace or environ.get("POD_NAMESPACE") or None


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="node-agent",
        description="Reconcile registry pull credentials into containerd's config.toml and "
        "the kubelet's config.json.",
    )
    parser.add_argument("--version", action="version", version=f"node-agent {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Every flag's help shows its default (from NODE_AGENT_* when that is set).
    commands_with_defaults = functools.partial(
        subcommands.add_parser, formatter_class=_DefaultsHelpFormatter
    )
    reconcile = commands_with_defaults("reconcile", help="one reconcile pass")
    _add_node_flags(reconcile, environ)["node files"].add(
        "--dry-run", action="store_true", help="print a redacted diff; write and restart nothing"
    )
    run = commands_with_defaults(
        "run", help="the per-node daemon: follow the sources, keep the node files in sync"
    )
    _add_daemon_flags(run, environ)
    check = commands_with_defaults("check", help="exit 0 if in sync, 3 if not")
    _add_node_flags(check, environ)
    demo = subcommands.add_parser("demo", help="run on an embedded sample node tree (no root)")
    demo.add_argument(
        "--dir",
        type=Path,
        default=Path("demo-node"),
        help="where to lay out the sample node (default ./demo-node)",
    )
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags. Raises ValueError for combinations argparse cannot see."""
    _check_host_root(args.host_root)
    return Settings(
        secret_files=tuple(args.secret_file),
        fallback_secret_files=tuple(args.fallback_secret_file),
        containerd_config=args.containerd_config,
        containerd_config_version=args.containerd_config_version,
        kubelet_config=args.kubelet_config,
        credential_provider_bin_dir=args.credential_provider_bin_dir,
        credential_provider_config=args.credential_provider_config,
        credential_provider_cache_duration=args.credential_provider_cache_duration,
        credential_provider_match_images=args.credential_provider_match_images,
        targets=args.targets,
        host_root=args.host_root,
        state_dir=args.state_dir,
        restart_mode=args.reload,
        restart_command=_restart_command(args.reload, args.reload_command),
        restart_timeout=args.reload_timeout,
        containerd_socket=args.containerd_socket,
        system_bus_socket=args.system_bus_socket,
        restart_trigger_dir=args.restart_trigger_dir,
        dry_run=getattr(args, "dry_run", False),
        log_format=args.log_format,
        log_level=args.log_level,
    )


def _check_host_root(host_root: Path) -> None:
    # A file here would otherwise surface as "Not a directory" on the first node path.
    if host_root.exists() and not host_root.is_dir():
        raise ValueError(
            f"--host-root {printable(str(host_root))} is a file, not a directory: give the "
            "directory where the node's filesystem is mounted (/ on the node, /host in the "
            "DaemonSet)"
        )


def _restart_command(mode: str, text: str | None) -> tuple[str, ...]:
    """`--reload-command` split into its argv, here and only here."""
    if mode != "command":
        if text:
            raise ValueError(f"--reload-command is only used with --reload command, not {mode}")
        return ()
    try:
        argv = tuple(shlex.split(text or ""))
    except ValueError as error:
        raise ValueError(f"--reload-command cannot be parsed: {error}") from None
    if not argv:
        raise ValueError("--reload command needs --reload-command")
    return argv


def daemon_settings_from(args: argparse.Namespace) -> DaemonSettings:
    """DaemonSettings from the flags of `run`. Raises ValueError for unusable combinations."""
    node = settings_from(args)
    secrets, fallback_secrets = tuple(args.secret), tuple(args.fallback_secret)
    if not (secrets or fallback_secrets or node.secret_files or node.fallback_secret_files):
        raise ValueError(
            "at least one source is needed: --secret, --fallback-secret, --secret-file or "
            "--fallback-secret-file"
        )
    if args.resync_interval < 1:
        raise ValueError("--resync-interval must be at least 1s")
    events = bool(secrets or fallback_secrets) if args.events is None else args.events
    if events and not args.node_name:
        raise ValueError("Events need --node-name (or NODE_NAME); or turn them off: --no-events")
    _check_listen_address(args.metrics_address)
    settings = DaemonSettings(
        node=node,
        secrets=secrets,
        fallback_secrets=fallback_secrets,
        kubeconfig=args.kubeconfig,
        on_secret_delete=args.on_secret_delete,
        resync_interval=args.resync_interval,
        debounce=args.debounce,
        min_restart_interval=args.min_reload_interval,
        node_name=args.node_name,
        metrics_address=args.metrics_address,
        events=events,
        once=args.once,
        restarts=_restart_coordination(args),
        recover_stuck_pods=args.recover_stuck_pods,
        recover_stuck_pods_rate=args.recover_stuck_pods_rate,
    )
    if settings.coordinates_restarts:
        _check_restart_coordination(settings)
    if settings.recover_stuck_pods:
        _check_stuck_pod_recovery(settings)
    return settings


def _check_stuck_pod_recovery(settings: DaemonSettings) -> None:
    if not (settings.secrets or settings.fallback_secrets):
        raise ValueError("--recover-stuck-pods needs an API source: --secret or --fallback-secret")
    if not settings.node_name:
        raise ValueError("--recover-stuck-pods needs this node's name: --node-name (or NODE_NAME)")
    if settings.once:
        raise ValueError("--recover-stuck-pods needs the running daemon, not --once")


def _restart_coordination(args: argparse.Namespace) -> RestartCoordination:
    if args.restart_max_wait <= 0:
        raise ValueError("--restart-max-wait must be more than 0s")
    return RestartCoordination(
        concurrency=args.restart_concurrency,
        lease_ttl=args.restart_lease_ttl,
        max_wait=args.restart_max_wait,
        settle=args.restart_settle,
        lease_namespace=args.restart_lease_namespace,
    )


def _check_restart_coordination(settings: DaemonSettings) -> None:
    restarts = settings.restarts
    problem = restarts.lease_ttl_problem(settings.node.restart_timeout)
    if problem is not None:
        raise ValueError(problem)
    if not settings.node_name:
        raise ValueError(
            "restart slots need this node's name: --node-name (or NODE_NAME); "
            "or --restart-concurrency 0 to restart without coordination"
        )
    if not restarts.lease_namespace or not _DNS_LABEL.match(restarts.lease_namespace):
        raise ValueError(
            "restart slots need a namespace for their Leases: --restart-lease-namespace "
            "(or POD_NAMESPACE); or --restart-concurrency 0 to restart without coordination"
        )


def _check_listen_address(address: str) -> None:
    # Imported here: only `run` serves metrics (prometheus-client is not needed otherwise).
    from node_agent.status_server import BindAddress  # noqa: PLC0415

    BindAddress.parse(address)  # ValueError names the flag's value and the expected form


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The command line; the exit code. Never exits itself: argparse's usage errors and
    `--help` (which it prints, then raises SystemExit for) become return codes here."""
    parser = build_parser(os.environ if environ is None else environ)
    try:
        return _main(parser, argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE


def _main(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    if args.command == "demo":
        configure_logging(log_format="text", level="warning")
        return _run(lambda: demo_command(args.dir, sys.stdout), name="running the demo")
    if args.command == "run":
        return _run_daemon(parser, args)
    try:
        settings = settings_from(args)
    except ValueError as error:
        parser.error(str(error))
    if not settings.secret_files and not settings.fallback_secret_files:
        parser.error("at least one --secret-file or --fallback-secret-file is needed")
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    command = commands.reconcile_command if args.command == "reconcile" else commands.check_command
    return _run(
        lambda: command(settings, sys.stdout),
        name=f"running {args.command}",
        log_format=settings.log_format,
    )


def _run_daemon(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        settings = daemon_settings_from(args)
    except ValueError as error:
        parser.error(str(error))
    configure_logging(log_format=settings.node.log_format, level=settings.node.log_level)
    # Imported here: `reconcile` and `check` need neither watchdog nor the daemon.
    from node_agent.daemon.run import run_daemon  # noqa: PLC0415

    return _run(
        lambda: run_daemon(settings), name="running the daemon", log_format=settings.node.log_format
    )


def _run(command: Any, *, name: str, log_format: str = "text") -> int:
    try:
        code: int = command()
    except NodeAgentError as error:
        _fatal(printable(str(error)), log_format=log_format)
        return EXIT_ERROR
    except Exception as error:
        _fatal(str(unexpected(error, doing=name)), log_format=log_format)
        return EXIT_ERROR
    return code


def _fatal(message: str, *, log_format: str) -> None:
    """The one line a failed command ends with: plain, or a JSON log record like the rest of
    its output under `--log-format json`."""
    if log_format == "json":
        print(fatal_json(message), file=sys.stderr)
    else:
        print(f"node-agent: error: {message}", file=sys.stderr)
