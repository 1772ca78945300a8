"""Tandem: edge-cloud collaborative inference for small language models.

The SDK: `Client` / `AsyncClient` call a hub; `Budget` states what a request must meet; errors
are in `tandem.errors`. The SDK knows only the wire protocol (tandem/v1), nothing of the hub.
"""

from tandem.client import AsyncClient, Client
from tandem.errors import (
    BudgetUnsatisfiable,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    TandemError,
    Unauthenticated,
    Unavailable,
)
from tandem.types import (
    Budget,
    Choice,
    Chunk,
    EnrollmentToken,
    ExpertWeight,
    GenerateResult,
    Placement,
    TokenLogprob,
)

__version__ = "0.1.0"
__all__ = [
    "AsyncClient",
    "Budget",
    "BudgetUnsatisfiable",
    "Choice",
    "Chunk",
    "Client",
    "DeadlineExceeded",
    "EnrollmentToken",
    "ExpertWeight",
    "GenerateResult",
    "InvalidRequest",
    "Overloaded",
    "Placement",
    "TandemError",
    "TokenLogprob",
    "Unauthenticated",
    "Unavailable",
]
