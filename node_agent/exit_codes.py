"""The exit codes of every command, in one place (README "Commands")."""

from typing import Final

EXIT_OK: Final = 0
"""Done: applied, already in sync, or (`run`) stopped by a signal."""
EXIT_ERROR: Final = 1
"""An error, reported on one line."""
EXIT_USAGE: Final = 2
"""Flags that do not fit (argparse's own code)."""
EXIT_OUT_OF_SYNC: Final = 3
"""`check`: the node files do not match the credentials."""
