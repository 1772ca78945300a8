"""Errors raised by the models package.

Every error a caller can provoke with bad input derives from `TandemModelError`, so the CLI and the
servers can map the whole family to a clear message (or a status code) in one place.
"""

from __future__ import annotations


class TandemModelError(Exception):
    """Base class: something about a model, its file or a request for it is wrong."""


class GGUFError(TandemModelError):
    """The file is missing, truncated, corrupt or not a GGUF file at all."""


class UnsupportedArchitecture(TandemModelError):
    """The GGUF declares an architecture (or tensor type) this implementation does not run."""


class ChecksumMismatch(TandemModelError):
    """A fetched or cached model file does not have the SHA-256 the zoo expects."""


class UnknownModel(TandemModelError, KeyError):
    """A name that is neither in the zoo nor an existing GGUF file path."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown model"


class ModelNotPulled(TandemModelError):
    """A zoo model that has not been fetched into the cache yet."""


class InvalidRequest(TandemModelError, ValueError):
    """A generation request with invalid parameters (sampling, lengths, prompt)."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt does not fit in the model's context window."""
