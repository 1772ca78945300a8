"""Typed errors of the SDK, mapped from the hub's gRPC status codes and error metadata."""

from __future__ import annotations

import grpc


class TandemError(Exception):
    """Base of every SDK error. `code` is the gRPC status code name the hub answered with."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(TandemError):
    """The request was malformed: empty prompt, bad sampling values, too large, unknown model."""


class BudgetUnsatisfiable(TandemError):
    """No placement meets the budget; `binding` names the constraint (ttft_ms, tpot_ms, energy_j)."""

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION", binding: str = "") -> None:
        super().__init__(message, code)
        self.binding = binding


class Unauthenticated(TandemError):
    """Missing or wrong API key."""


class Unavailable(TandemError):
    """The hub (or the device serving the request) could not be reached or went away."""


class DeadlineExceeded(TandemError):
    """The call's deadline passed before the answer was complete."""


class Overloaded(TandemError):
    """The hub refused the request for now: it is serving its limit of requests, or the API key is over
    its rate. `retry_after_s` is when the hub says to try again (None when it did not say)."""

    def __init__(self, message: str, code: str = "RESOURCE_EXHAUSTED", retry_after_s: float | None = None) -> None:
        super().__init__(message, code)
        self.retry_after_s = retry_after_s


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
}


def from_rpc_error(exc: grpc.RpcError) -> TandemError:
    """The typed error for a failed call."""
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details() or code.name  # type: ignore[attr-defined]
    trailing = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    if trailing.get("x-tandem-error") == "budget_unsatisfiable":
        return BudgetUnsatisfiable(details, code.name, trailing.get("x-tandem-binding", ""))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(details, code.name, _seconds(trailing.get("retry-after")))
    return _BY_CODE.get(code, TandemError)(details, code.name)


def _seconds(value: str | None) -> float | None:
    """A retry-after value as seconds; None when absent or not a finite, non-negative number."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return seconds if 0 <= seconds < float("inf") else None
