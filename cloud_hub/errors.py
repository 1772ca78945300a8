"""Hub errors, each with the gRPC status code it maps to (the interceptor does the mapping)."""

from __future__ import annotations

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
    code, kind = grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"


class BudgetUnsatisfiable(HubError):
    """No placement meets the budget; `binding` names the constraint that rules out the best one."""

    code, kind = grpc.StatusCode.FAILED_PRECONDITION, "budget_unsatisfiable"

    def __init__(self, message: str, binding: str) -> None:
        super().__init__(message)
        self.binding = binding

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (*super().metadata(), ("x-tandem-binding", self.binding))
