"""Human-readable output: redacted diffs and change summaries. Pure."""

import difflib

from node_agent.reconcile import PreparedFile


def redacted_diff(prepared: PreparedFile) -> str:
    """A unified diff of what a write would change, every credential value shown as `***`.

    Credential values are redacted on both sides, so a password change alone shows no line:
    `change_summary` names such registries.
    """
    file_format = prepared.node_file.format
    path = str(prepared.node_file.path)
    old = file_format.redact(prepared.old_text) if prepared.old_text is not None else ""
    new = file_format.redact(prepared.new_text) if prepared.new_text is not None else ""
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=path if prepared.old_text is not None else "/dev/null",
        tofile=path,
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def change_summary(prepared: PreparedFile) -> list[str]:
    """One line per registry key the write changes, e.g. `containerd: update 127.0.0.1:5000`."""
    name = prepared.node_file.name
    lines = [f"{name}: {change.action} {change.key}" for change in prepared.plan.changes]
    if not lines and prepared.needs_write:
        # A file the agent writes whole, whose own settings changed (e.g. cacheDuration).
        lines.append(f"{name}: rewrite {prepared.node_file.path}")
    return lines


def empty_credentials_warning(removed: int) -> str:
    """What to say when credentials that name no registry take entries off the node."""
    return (
        f"the credentials name no registry: {removed} entries the agent manages are removed "
        "from the node (an empty or wrongly filled Secret?)"
    )
