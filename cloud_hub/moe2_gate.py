"""MoE²'s gate in the hub: each request's own gate weights over the expert table's columns.

`PromptGate.load(path, table)` loads the gate `tandem experts train` saved (partitioner.moe2.gate) and
the embedder of the feature kind it reads (partitioner.moe2.features). It refuses, with GateMismatch
at hub start, a gate trained for another expert set than the table's: the table's weights and losses
were measured with the gate it was trained beside, and its columns are the gate's outputs.

`weights(prompt)` computes the prompt's features exactly as training computed them
(features.prompt_vector) and the gate's softmax over the table's columns (E,), in the table's order.
A prompt without features gets None, and the router falls back to the gate's prior (its mean weights
over the calibration requests, ExpertTable.prior):
- token ids: they are ids of the request's model's vocabulary, not necessarily of the base model
  whose embeddings "hidden" and "embed" read, and MiniLM reads text;
- an empty prompt (validation refuses it before routing; kept total here).
Chat messages are read as their contents joined by newlines (calibration prompts are plain text).

What a kind costs per request on two cores, prompts of 16 to 512 tokens, the router's whole choice
included (benchmarks/moe2_overhead.py, docs/benchmarks.md): "embed" (a tokenization, a table lookup, a
mean) 0.3 to 1.2 ms; "minilm" (6 layers) 13 to 80 ms; "hidden" (SmolLM2's 30 layers) 80 to 1400 ms,
blocking the hub's event loop that long. The issue's 5 ms serving budget holds for "embed" only.
The features run on the caller's torch threads (the hub's; changing torch's process-wide thread
count would slow a cloud model generating beside it).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from cloud_hub.prompt import RequestPrompt
from models.embeddings import Embedder
from partitioner.moe2.dataset import SMOLLM
from partitioner.moe2.features import feature_embedder, prompt_vector
from partitioner.moe2.gate import Gate
from partitioner.moe2.table import ExpertTable

__all__ = ["PromptGate", "prompt_text"]


def prompt_text(prompt: RequestPrompt) -> str | None:
    """The text a prompt's features read: the text itself, or a chat's contents joined by newlines;
    None for token ids and for an empty prompt (module docstring)."""
    if prompt.kind == "text":
        text = str(prompt.value)
    elif prompt.kind == "chat":
        text = "\n".join(m["content"] for m in prompt.value)  # type: ignore[index, union-attr]
    else:
        return None
    return text if text.strip() else None


class PromptGate:
    """A gate serving an expert table's columns, with the embedder of its feature kind."""

    def __init__(self, gate: Gate, table: ExpertTable, embedder: Embedder) -> None:
        """Raises GateMismatch when `gate` was trained for another expert set than `table`'s, and
        ValueError when `embedder` gives vectors of another length than the gate reads."""
        self.gate = gate.serving(table.variants)
        """The gate, its outputs in the table's column order."""
        self.embedder = embedder
        """Computes the gate's features (features.feature_embedder of its kind)."""
        self._ready: dict[int, tuple[RequestPrompt, np.ndarray | None]] = {}  # prepare()'s, by id(prompt)
        self._lock = threading.Lock()
        if embedder.dimensions != gate.manifest.dims:
            raise ValueError(
                f"the gate reads {gate.manifest.dims}-d {gate.manifest.feature_kind} features; "
                f"{embedder.name} gives {embedder.dimensions}-d ones"
            )

    @property
    def kind(self) -> str:
        """The feature kind the gate reads ("hidden", "minilm" or "embed")."""
        return self.gate.manifest.feature_kind

    @classmethod
    def load(cls, path: Path, table: ExpertTable, base: str = SMOLLM) -> PromptGate:
        """The gate at `path` for `table`, with its feature kind's embedder (`base`: the model whose
        embeddings "hidden" and "embed" read, as in training). Raises GateMismatch (another expert set
        than the table's, another format, a damaged file), FileNotFoundError, and what loading the
        embedder raises (EmbeddingsUnavailable, ModelNotPulled)."""
        gate = Gate.load(path)
        gate.serving(table.variants)  # refuse before loading an embedder (seconds)
        return cls(gate, table, feature_embedder(gate.manifest.feature_kind, base))

    def features(self, prompt: RequestPrompt) -> np.ndarray | None:
        """(D,) float32 features of the prompt, or None for one without (module docstring)."""
        text = prompt_text(prompt)
        return None if text is None else prompt_vector(self.embedder, text)

    def weights(self, prompt: RequestPrompt) -> np.ndarray | None:
        """(E,) float64 gate weights of the prompt over the table's columns (summing to 1), or None
        for a prompt without features. Those `prepare` computed for this prompt are taken, once."""
        with self._lock:
            ready = self._ready.pop(id(prompt), None)
        if ready is not None and ready[0] is prompt:
            return ready[1]
        x = self.features(prompt)
        return None if x is None else self.gate.weights(x[None, :])[0]

    def prepare(self, prompt: RequestPrompt) -> None:
        """Compute the prompt's weights now (in a worker thread: a forward pass for "hidden" or
        "minilm" must not hold the hub's event loop), for the `weights` call routing makes next."""
        w = self.weights(prompt)
        with self._lock:
            if len(self._ready) > 256:  # requests that never routed (refused before): forget the oldest
                self._ready.pop(next(iter(self._ready)))
            self._ready[id(prompt)] = (prompt, w)
