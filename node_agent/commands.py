"""The one-shot commands, `node-agent reconcile` and `node-agent check`: one pass of the
node's reconciler, its output for a person, and the exit code."""

import logging
from typing import TextIO

from node_agent.containerd_versions import ConfigTomlAuth
from node_agent.credentials import Credentials
from node_agent.errors import RestartFailed
from node_agent.exit_codes import EXIT_OK, EXIT_OUT_OF_SYNC
from node_agent.plugin_check import ask_plugin
from node_agent.preview import change_summary, empty_credentials_warning, redacted_diff
from node_agent.reconcile import Outcome, PreparedFile, Reconciler
from node_agent.settings import Settings
from node_agent.targets.credential_provider import PluginFormat, ResponseFormat
from node_agent.wiring import build_reconciler, containerd_support, load_sources

log = logging.getLogger(__name__)


def reconcile_command(settings: Settings, out: TextIO) -> int:
    """`node-agent reconcile`: one pass (or a redacted preview with --dry-run)."""
    credentials = load_sources(settings)
    outcome = _reconciler(settings).reconcile(credentials)
    _warn(outcome, empty=not credentials)
    if outcome.dry_run:
        _print_preview(outcome, out)
        return EXIT_OK
    if outcome.restart is not None and outcome.restart.error is not None:
        raise RestartFailed(outcome.restart.error)
    _print_result(outcome, out)
    return EXIT_OK


def check_command(settings: Settings, out: TextIO) -> int:
    """`node-agent check`: 0 when every file matches the credentials, 3 when not."""
    credentials = load_sources(settings)
    outcome = _reconciler(settings).inspect(credentials)
    _warn(outcome, empty=not credentials)
    for prepared in outcome.files:
        for line in change_summary(prepared):
            print(f"out of sync: {line}", file=out)
    if outcome.restart_owed:
        print("out of sync: containerd: not restarted since config.toml changed", file=out)
    plugin_ok = _check_plugin(outcome, credentials, out)
    if outcome.in_sync and plugin_ok:
        print("in sync", file=out)
        return EXIT_OK
    return EXIT_OUT_OF_SYNC


def _check_plugin(outcome: Outcome, credentials: Credentials, out: TextIO) -> bool:
    """Run the credential provider's plugin as the kubelet would, if it is a target here
    and installed; whether it answered with the response the credentials make."""
    plugin = _file_of(outcome, PluginFormat)
    response = _file_of(outcome, ResponseFormat)
    if plugin is None or response is None or not plugin.snapshot.exists:
        return True  # not a target here, or not installed yet (listed above)
    expected = response.node_file.format.desired_entries(credentials, {}).entries
    answer = ask_plugin(plugin.snapshot.path, expected)
    for problem in answer.problems:
        print(f"out of sync: {plugin.name}: asked for {answer.image}: {problem}", file=out)
    if answer.ok:
        print(f"{plugin.name}: answers as the kubelet asks ({len(expected)} registries)", file=out)
    return answer.ok


def _file_of(outcome: Outcome, format_type: type) -> PreparedFile | None:
    return next((p for p in outcome.files if isinstance(p.node_file.format, format_type)), None)


def _reconciler(settings: Settings) -> Reconciler:
    support = containerd_support(settings)
    if support.auth is not ConfigTomlAuth.WRITE:
        log.warning("%s", support.describe())
    return build_reconciler(settings, support=support)


def _print_preview(outcome: Outcome, out: TextIO) -> None:
    for prepared in outcome.files:
        if not prepared.needs_write:
            print(f"{prepared.node_file.name}: in sync ({prepared.node_file.path})", file=out)
            continue
        for line in change_summary(prepared):
            print(f"would {line}", file=out)
        out.write(redacted_diff(prepared))


def _print_result(outcome: Outcome, out: TextIO) -> None:
    for prepared in outcome.files:
        changes = [f"{change.action} {change.key}" for change in prepared.plan.changes]
        summary = ", ".join(changes) or "rewritten" if prepared.needs_write else "in sync"
        print(f"{prepared.node_file.name}: {summary}", file=out)
    if outcome.restart is not None:
        print("containerd: restarted, CRI answering", file=out)
    if outcome.kubelet_restart_needed:
        log.warning("%s", KUBELET_RESTART_NEEDED)


#: Said when the agent's entry in the kubelet's CredentialProviderConfig changed.
KUBELET_RESTART_NEEDED = (
    "the kubelet reads its CredentialProviderConfig only when it starts: restart the kubelet "
    "on this node for images of the registries just added to get credentials from the plugin"
)


def _warn(outcome: Outcome, *, empty: bool) -> None:
    for warning in outcome.warnings:
        log.warning(warning)
    if empty and outcome.removed:
        log.warning("%s", empty_credentials_warning(outcome.removed))
