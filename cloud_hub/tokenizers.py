"""The tokenizers of the models the hub routes to, by zoo name: what the HTTP API names tokens with
(logprobs) and counts them with, for models served on devices as much as for the hub's own.

Each is built from the model's GGUF metadata (models.runtime.load with prepare=False: the weights
are mapped, never read), once, and kept: a handful of models, a few MB each.
"""

from __future__ import annotations

import functools

from cloud_hub.errors import NotFound
from models.errors import TandemModelError
from models.tokenizer import GGUFTokenizer


@functools.lru_cache(maxsize=8)
def tokenizer_for(model: str) -> GGUFTokenizer:
    """The tokenizer of zoo model `model`; raises NotFound naming it when the hub has no copy of it."""
    from models.runtime import load  # torch and the zoo: only for requests that need a tokenizer

    try:
        return load(model, prepare=False).tokenizer
    except (TandemModelError, OSError, ValueError) as exc:
        raise NotFound(f"model: the hub has no tokenizer for {model!r}: {exc}") from exc
