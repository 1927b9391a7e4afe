"""Waiting for something the agent does on another thread or in another process."""

import time
from collections.abc import Callable

POLL_SECONDS = 0.01


def wait_until(
    condition: Callable[[], object],
    timeout: float = 3.0,
    what: str | Callable[[], str] = "",
) -> float:
    """Poll until `condition()` is truthy; the seconds it took. Fails after `timeout`, saying
    `what` (a callable: asked only then, so it can describe the state at that moment)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            described = what() if callable(what) else what
            raise AssertionError(f"not within {timeout:g}s: {described}".rstrip(": "))
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started
