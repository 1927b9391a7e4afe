"""The daemon's file watch: a node file whose directory does not exist yet (a target whose
directory the node image has not made) is left to the periodic resync, and every other
directory is still watched."""

import logging
import threading
from pathlib import Path

import pytest

from node_agent.daemon.file_watch import DirectoryWatch, interest_in_file


def test_a_missing_directory_is_reported_and_the_others_are_still_watched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changed = threading.Event()
    watch = DirectoryWatch(
        [
            interest_in_file(tmp_path / "not-yet" / "config.yaml", lambda: None),
            interest_in_file(tmp_path / "config.json", changed.set),
        ]
    )
    with caplog.at_level(logging.WARNING):
        watch.start()
    try:
        assert watch.is_alive()
        (tmp_path / "config.json").write_text("{}")
        assert changed.wait(5), "the existing directory is not watched"
    finally:
        watch.stop()
    assert f"cannot watch {tmp_path / 'not-yet'}" in caplog.text
