"""The agent's own error types. Each carries enough context for a one-line message.

No message ever contains a credential value: callers pass registry names, source names
and field names only.
"""

import json
import logging
import traceback

log = logging.getLogger(__name__)


class NodeAgentError(Exception):
    """Base of every error the agent reports to the operator."""


class InvalidCredentials(NodeAgentError):
    """A credentials source is missing, unparseable or semantically wrong."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: {field}: {problem}")


class UnsupportedConfig(NodeAgentError):
    """A node file cannot be edited safely (unparseable, unknown layout, wrong version)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ConcurrentModification(NodeAgentError):
    """Someone else changed a node file between our read and our rename."""


class WriteFailed(NodeAgentError):
    """A node file or the state could not be written; the old content is intact."""


class RestartFailed(NodeAgentError):
    """containerd did not come back healthy after a restart."""


class InternalError(NodeAgentError):
    """An exception the agent did not expect: a bug. The message says what the agent was
    doing; where it happened is logged at debug level."""


def json_position(error: BaseException) -> str:
    """Where a JSON document stopped parsing, as ` (line L, column C)`, or "" when unknown.
    Only the position: the parser's message may quote the text (a password, say)."""
    if isinstance(error, json.JSONDecodeError):
        return f" (line {error.lineno}, column {error.colno})"
    return ""


def unexpected(error: BaseException, *, doing: str) -> InternalError:
    """`error` as a one-line InternalError. The stack goes to the debug log without the
    exception's own message, which may quote the input (a credential, say)."""
    kind = type(error).__name__
    stack = "".join(traceback.format_tb(error.__traceback__))
    log.debug("unexpected %s while %s, at:\n%s", kind, doing, stack.rstrip())
    return InternalError(
        f"unexpected {kind} while {doing}; this is a bug in node-agent: please report it "
        "with the stack that --log-level debug logs"
    )
