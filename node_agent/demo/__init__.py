"""`node-agent demo`: the agent's main job on an embedded sample node, no cluster, no root.

Lays out a sample node tree (a realistic containerd 1.6 config.toml with a foreign registry
entry, a kubelet config.json left behind by `docker login`) and a sample Secret manifest under
a directory, then runs the same code paths as `node-agent reconcile` and `check` on it.
"""

import shutil
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TextIO

from node_agent import commands
from node_agent.settings import Settings

SAMPLE_FILE_MODES = {
    "node/etc/containerd/config.toml": 0o644,
    "node/var/lib/kubelet/config.json": 0o600,
    "secret.yaml": 0o600,
}


def lay_out_sample(directory: Path) -> None:
    """Copy the sample node and Secret into `directory`, resetting an earlier demo there."""
    sample = resources.files(__name__)
    for relative, mode in SAMPLE_FILE_MODES.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(sample.joinpath(relative).read_bytes())
        target.chmod(mode)
    shutil.rmtree(directory / "node/var/lib/node-agent", ignore_errors=True)


def demo_command(directory: Path, out: TextIO) -> int:
    lay_out_sample(directory)
    node = directory / "node"
    settings = Settings(
        secret_files=(directory / "secret.yaml",), host_root=node, restart_mode="none"
    )
    flags = f"--secret-file {directory}/secret.yaml --host-root {node} --reload none"
    print(f"# sample node under {node}, sample Secret {directory}/secret.yaml\n", file=out)
    print(f"$ node-agent reconcile --dry-run {flags}", file=out)
    commands.reconcile_command(replace(settings, dry_run=True), out)
    print(f"\n$ node-agent reconcile {flags}", file=out)
    commands.reconcile_command(settings, out)
    print(f"\n$ node-agent check {flags}", file=out)
    code = commands.check_command(settings, out)
    print("\n# run it again: nothing is written (same mtimes), `check` still exits 0.", file=out)
    return code
