"""Hub errors, each with the gRPC status code it maps to (the interceptor does the mapping)."""

from __future__ import annotations

import math

import grpc


class HubError(Exception):
    """Base: a request the hub refuses, with a status code and a message for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    kind: str = "internal"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-tandem-error", self.kind),)


class InvalidRequest(HubError):
    code, kind = grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"


class Unauthenticated(HubError):
    code, kind = grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"


class PermissionDenied(HubError):
    code, kind = grpc.StatusCode.PERMISSION_DENIED, "permission_denied"


class NotFound(HubError):
    code, kind = grpc.StatusCode.NOT_FOUND, "not_found"


class Unavailable(HubError):
    code, kind = grpc.StatusCode.UNAVAILABLE, "unavailable"


class Overloaded(HubError):
    """The hub cannot take the request now (its in-flight limit); `retry_after_s` says when to try again.

    The edges send it in whole seconds, at least 1: gRPC as trailing metadata `retry-after`, HTTP as
    the `Retry-After` header of a 429."""

    code, kind = grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        """`retry_after_s` as HTTP's Retry-After writes it: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (*super().metadata(), ("retry-after", self.retry_after))


class RateLimited(Overloaded):
    """The caller's API key is over its rate (`Limits.rate_per_s`); retry after `retry_after_s`."""

    kind = "rate_limited"


class BudgetUnsatisfiable(HubError):
    """No placement meets the budget; `binding` names the constraint that rules out the best one."""

    code, kind = grpc.StatusCode.FAILED_PRECONDITION, "budget_unsatisfiable"

    def __init__(self, message: str, binding: str) -> None:
        super().__init__(message)
        self.binding = binding
        self.considered: tuple = ()
        """What the router weighed (cloud_hub.router.Scored each), for the hub's journal."""
        self.quantile = 0.0
        """The admission quantile it weighed them at (0: the mean prediction)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (*super().metadata(), ("x-tandem-binding", self.binding))
