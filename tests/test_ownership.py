"""The agent's state in its state dir (`StateStore`): what is saved, what is refused on
load, what a killed save leaves behind."""

from pathlib import Path

import pytest

from node_agent.errors import UnsupportedConfig
from node_agent.ownership import AgentState, LastGood, StateStore


def test_the_last_good_config_is_kept_in_the_state_only_while_a_restart_is_pending(
    tmp_path: Path,
) -> None:
    """Found by: crash (RELIABILITY.md, "Bugs found")."""
    store = StateStore(tmp_path)
    during = AgentState(
        containerd_restart_pending=True,
        containerd_last_good=LastGood(str(tmp_path / "config.toml"), None),
    )
    store.save(during)
    assert store.load() == during
    store.save(AgentState())
    assert "containerd_last_good" not in (tmp_path / "owned.json").read_text()


def test_a_state_with_a_malformed_last_good_is_refused(tmp_path: Path) -> None:
    """Found by: crash (RELIABILITY.md, "Bugs found")."""
    (tmp_path / "owned.json").write_text(
        '{"version": 1, "owned": {}, "containerd_last_good": {"path": 3}}'
    )
    with pytest.raises(UnsupportedConfig, match="containerd_last_good"):
        StateStore(tmp_path).load()


def test_a_temp_file_a_killed_state_save_left_is_removed_by_the_next_save(tmp_path: Path) -> None:
    """Found by: crash (RELIABILITY.md, "Bugs found")."""
    leftover = tmp_path / ".owned.json.node-agent-4242.tmp"
    leftover.write_text("{")
    StateStore(tmp_path).save(AgentState())
    assert not leftover.exists()
