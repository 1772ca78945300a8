"""The inference-engine interface: one model on one device, many requests, each with its own state.

Layer ranges are half-open `[start, end)` with global layer indices; `run_layers` is what split
inference and layer skipping build on. Shapes: logits (V,), hidden states (1, T, D).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from models.loaded import LoadedModel


class EngineUnavailable(RuntimeError):
    """The engine or its device cannot run here (missing backend, no GPU); raised at load time."""


class InferenceEngine(ABC):
    loaded: LoadedModel | None = None
    """The model as loaded (config, tokenizer, the torch module where the engine runs one);
    None before load()."""

    @abstractmethod
    def load(self, model: str) -> dict:
        """Load a zoo name, GGUF path or bundle; returns its description (models.loaded.LoadedModel.describe)."""

    @abstractmethod
    def prefill(self, request_id: str, ids: Sequence[int], max_len: int) -> Tensor:
        """Start a request with prompt ids and room for max_len positions; (V,) next-token logits."""

    @abstractmethod
    def decode(self, request_id: str, token: int) -> Tensor:
        """Feed one token to a started request; (V,) next-token logits."""

    @abstractmethod
    def run_layers(self, request_id: str, hidden: Tensor, start: int, end: int, position: int) -> Tensor:
        """Run layers [start, end) on (1, T, D) hidden states at positions [position, position+T)."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Free a request's state (its KV cache); unknown ids are ignored."""
