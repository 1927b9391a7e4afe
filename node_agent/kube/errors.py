"""Failures of reading a source through the Kubernetes API, in the agent's own terms.

None of these ever means "the Secret is gone": only the API confirming absence does (see
`secret_watch`). Messages name namespaces, Secret names and HTTP statuses, never data.
"""

from typing import ClassVar, Literal

from node_agent.errors import NodeAgentError

ErrorReason = Literal["forbidden", "unreachable", "invalid"]
"""The `reason` label of `node_agent_source_errors_total` for API sources."""


class SourceError(NodeAgentError):
    """Reading a source through the API failed; the last applied credentials stay."""

    reason: ClassVar[ErrorReason] = "unreachable"

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class SourceUnavailable(SourceError):
    """The API could not be asked or did not answer usefully: connection refused or reset,
    timeouts, a dropped or stalled watch, 5xx, 429. Retried with backoff."""

    reason = "unreachable"


class SourceForbidden(SourceError):
    """The API refused the agent (401/403): its token or RBAC is wrong. Retried with backoff,
    because RBAC can be fixed without restarting the agent."""

    reason = "forbidden"


class SourceInvalid(SourceError):
    """The API answered something the agent cannot use (malformed JSON, an object without a
    resourceVersion, Secret data that is not base64)."""

    reason = "invalid"


class WatchExpired(NodeAgentError):
    """410 Gone: the watch's resourceVersion is older than the API server's history. Only a
    new list can tell what was missed; this is routine, not an error."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        super().__init__(f"{source}: {problem}")


class ApiConflict(NodeAgentError):
    """409: a create found the name taken (`already_exists`), or an update carried a
    resourceVersion someone else has changed since. Routine for optimistic concurrency."""

    def __init__(self, ref: str, problem: str, *, already_exists: bool) -> None:
        self.ref = ref
        self.already_exists = already_exists
        super().__init__(f"{ref}: {problem}")


class ObjectMissing(NodeAgentError):
    """404 on an update: the object was deleted (by an operator, say) since it was read."""

    def __init__(self, ref: str, problem: str) -> None:
        self.ref = ref
        super().__init__(f"{ref}: {problem}")
