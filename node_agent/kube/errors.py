"""Failures of a Kubernetes API call, in the agent's own terms: for the Secret sources,
the Node Events and the restart-slot Leases alike.

None of these ever means "the Secret is gone": only the API confirming absence does (see
`secret_watch`). Messages name namespaces, object names and HTTP statuses, never data.
"""

from typing import ClassVar, Literal

from node_agent.errors import NodeAgentError

ErrorReason = Literal["forbidden", "unreachable", "invalid"]
"""Why an API call failed; for API sources, the `reason` label of
`node_agent_source_errors_total`."""


class ApiError(NodeAgentError):
    """An API call failed. For a source, the last applied credentials stay."""

    reason: ClassVar[ErrorReason] = "unreachable"

    def __init__(self, ref: str, problem: str) -> None:
        self.ref = ref
        self.problem = problem
        super().__init__(f"{ref}: {problem}")


class ApiUnavailable(ApiError):
    """The API could not be asked or did not answer usefully: connection refused or reset,
    timeouts, a dropped or stalled watch, 5xx, 429. Retried with backoff."""

    reason = "unreachable"


class ApiForbidden(ApiError):
    """The API refused the agent (401/403): its token or RBAC is wrong. Retried with backoff,
    because RBAC can be fixed without restarting the agent."""

    reason = "forbidden"


class ApiInvalid(ApiError):
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


class EvictionRefused(NodeAgentError):
    """429 on an eviction: a PodDisruptionBudget allows no disruption now. Routine: the
    eviction is asked for again later, with backoff."""

    def __init__(self, ref: str, problem: str) -> None:
        self.ref = ref
        super().__init__(f"{ref}: {problem}")
