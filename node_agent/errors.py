"""The agent's own error types. Each carries enough context for a one-line message.

No message ever contains a credential value: callers pass registry names, source names
and field names only.
"""


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


class ReloadFailed(NodeAgentError):
    """containerd did not come back healthy after a restart."""
