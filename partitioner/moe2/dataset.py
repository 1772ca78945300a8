"""MoE² training data: real-text requests and every expert variant's loss on them, cached on disk.

A request is a prompt cut from one corpus document (models.corpus) and its true continuation, the
text that follows it there. Calibration requests come from calibration documents only, evaluation
requests from evaluation documents only, so the two never share a document. Cuts fall at word
boundaries: the prompt ends before a whitespace run and the continuation starts with it, so each
tokenizer reads the prompt's tokens unchanged at the front of the whole text's.

An expert variant's loss on a request is the teacher-forced loss of the continuation given the
prompt, in bits per byte: (sum over the continuation's tokens of -log2 p) / (UTF-8 bytes those
tokens spell). Bytes, not tokens, because the experts' tokenizers differ (SmolLM2 and Gemma 3).

Cache: `<tandem cache>/moe2/losses/<key>.npz`, one file per (variant, split, prompt spec), keyed by
the variant, its weights file (path, size, mtime), the requests' text and FORMAT; written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models import zoo
from models.corpus import DOC_ROOT, documents
from models.eval import windows
from models.loaded import LoadedModel
from models.prune import block_influence, prune_layers
from models.runtime import load
from models.tokenizer import GGUFTokenizer
from models.transformer import Step, Transformer

FORMAT = 1
"""Bump when requests or scoring change: every cached loss matrix is then recomputed."""
SPLITS = ("calibration", "eval")
SMOLLM, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
PRUNE_DOCS, PRUNE_TOKENS = 8, 256  # what `tandem optimize` ranks layers on (calibration text)

Progress = Callable[[int], None]
"""Called with how many requests were just finished."""


@dataclass(frozen=True)
class PromptSpec:
    """How requests are cut from a split's documents."""

    n_requests: int
    """R: requests to cut (one per document, evenly spread; more windows per document when R exceeds them)."""
    prompt_chars: tuple[int, int] = (192, 512)
    """Least and most characters of a prompt (about 48-128 tokens); each request's is drawn in between."""
    continuation_chars: int = 192
    """Characters of a continuation (about 48 tokens), cut back to a word boundary."""

    def __post_init__(self) -> None:
        lo, hi = self.prompt_chars
        if self.n_requests < 1 or not 0 < lo <= hi or self.continuation_chars < 8:
            raise ValueError(f"bad prompt spec: {self}")


@dataclass(frozen=True)
class Request:
    """One prompt and its true continuation, cut from a document."""

    document: str
    """The corpus document it was cut from (relative path)."""
    offset: int
    """Character offset of the prompt in the document."""
    prompt: str
    """What the expert reads."""
    continuation: str
    """The text that follows the prompt in the document: what the loss scores."""

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the continuation."""
        return len(self.continuation.encode())


@dataclass(frozen=True)
class Variant:
    """One expert variant: a model at a precision, optionally with layers pruned."""

    model: str
    """Zoo name or .gguf path."""
    quant: str = "fp32"
    """Precision it loads at (models.runtime.QUANTS)."""
    drop_layers: int = 0
    """Least influential layers dropped (models.prune), ranked on calibration text."""

    @property
    def family(self) -> str:
        """The model's name (a file's stem): its tokenizer family too, since each model has its own."""
        return Path(self.model).stem if self.model.endswith(".gguf") else self.model

    @property
    def label(self) -> str:
        """How the model is reduced: "fp32", "int8", "int4", "source", "pruned-4", "pruned-4-int8"."""
        if not self.drop_layers:
            return self.quant
        return f"pruned-{self.drop_layers}" + ("" if self.quant == "fp32" else f"-{self.quant}")

    @property
    def id(self) -> str:
        """Unique name, e.g. "smollm2-135m-instruct/int4"."""
        return f"{self.family}/{self.label}"


VARIANTS: tuple[Variant, ...] = (
    Variant(SMOLLM, "fp32"),
    Variant(SMOLLM, "int8"),
    Variant(SMOLLM, "int4"),
    Variant(SMOLLM, "fp32", 4),
    Variant(SMOLLM, "fp32", 8),
    Variant(GEMMA, "int8"),
    Variant(GEMMA, "int4"),
    Variant(SMOLLM, "source"),
    Variant(GEMMA, "source"),
)
"""The issue's variants: SmolLM2-135M at fp32, int8, int4, pruned by 4 and 8 layers; Gemma 3 270M at
int8 and int4; both at the precision their GGUF stores ("source")."""


# -- requests -------------------------------------------------------------------------------------------


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _word_end(text: str, pos: int) -> int:
    """The start of the whitespace run at or before `pos`: a cut there ends a word (0 if none)."""
    pos = min(pos, len(text) - 1)
    while pos > 0 and not (text[pos].isspace() and not text[pos - 1].isspace()):
        pos -= 1
    return pos


def _cut(name: str, text: str, window: int, spec: PromptSpec) -> Request | None:
    """Request `window` of document `name`, at a position and prompt length drawn from its name."""
    lo, hi = spec.prompt_chars
    need = hi + spec.continuation_chars + 2
    if len(text) < need:
        return None
    h = _digest(name, window)
    start = h % (len(text) - need + 1)
    while start < len(text) and not text[start].isspace():
        start += 1  # the prompt starts after a whitespace run: at a word
    while start < len(text) and text[start].isspace():
        start += 1
    plen = lo + (h >> 32) % (hi - lo + 1)
    end = _word_end(text, start + plen)
    stop = _word_end(text, end + spec.continuation_chars)
    prompt, continuation = text[start:end], text[end:stop]
    if len(prompt) < lo // 2 or len(continuation.strip()) < spec.continuation_chars // 2:
        return None
    return Request(name, start, prompt, continuation)


def requests(split: str, spec: PromptSpec, root: Path = DOC_ROOT) -> list[Request]:
    """`spec.n_requests` requests cut from the documents of `split` ("calibration" or "eval"): one per
    document, from documents spread evenly over the split by name (then the others, where a document
    gives no cut), then further windows of each document while R exceeds them (a later window may
    overlap an earlier one). Raises ValueError when the split cannot give that many;
    FileNotFoundError without the corpus."""
    docs = documents(split, root, min_chars=spec.prompt_chars[1] + spec.continuation_chars + 2)
    n = spec.n_requests
    spread = [docs[i * len(docs) // n] for i in range(n)] if n < len(docs) else docs
    order = spread + [d for d in docs if d not in spread]
    out: list[Request] = []
    for window in range(2 + n // max(len(docs), 1)):
        for d in order:
            if (r := _cut(d.name, d.text, window, spec)) is not None:
                out.append(r)
            if len(out) == n:
                return out
    raise ValueError(f"the {split} split gives {len(out)} requests of {spec}, not {n}")


# -- scoring one continuation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """A prompt and continuation as one model's tokens."""

    ids: tuple[int, ...]
    """The whole text's ids (BOS first where the model wants one)."""
    start: int
    """Index of the first scored token: the continuation's tokens are ids[start:]."""
    n_bytes: int
    """UTF-8 bytes the scored tokens spell (the continuation's, unless the cut merged across it)."""


@dataclass(frozen=True)
class Score:
    """One model's teacher-forced loss of one continuation."""

    bits: float
    """Sum of -log2 p over the scored tokens."""
    n_bytes: int
    """UTF-8 bytes those tokens spell."""
    n_tokens: int
    """Tokens scored."""

    @property
    def bpb(self) -> float:
        return self.bits / self.n_bytes


def tokenize(tokenizer: GGUFTokenizer, prompt: str, continuation: str) -> Tokens:
    """The prompt's and continuation's tokens. The scored tokens are those after the longest common
    prefix of the prompt's ids and the whole text's (all the continuation's when the tokenizer cuts at
    the word boundary, as it does for both zoo tokenizers). Raises ValueError when nothing is left to
    score or no token precedes the first scored one."""
    head, ids = tokenizer.encode(prompt), tokenizer.encode(prompt + continuation)
    start = next((i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b), min(len(head), len(ids)))
    if start < 1 or start >= len(ids):
        raise ValueError(f"nothing to score: {len(head)} prompt tokens, {len(ids)} in all, scoring from {start}")
    return Tokens(tuple(ids), start, sum(len(tokenizer.token_bytes(t)) for t in ids[start:]))


@torch.inference_mode()
def continuation_logprobs(model: Transformer, ids: Sequence[int], start: int) -> torch.Tensor:
    """(C, V) float32 log-probabilities of the next token at each continuation position: row i is the
    distribution ids[start + i] was drawn from (C = len(ids) - start). Reusable for ensembles, which mix
    these rows across experts sharing a tokenizer. Overwrites the model's cache."""
    model.setup_cache(1, len(ids))
    h = model.forward_layers(model.embed(torch.tensor([list(ids)])), Step.at(0, len(ids)))  # (1, T, D)
    logits = model.head(h[:, start - 1 : -1])[0].float()  # (C, V): only the rows that score; the head is costly
    return torch.log_softmax(logits, dim=-1)


def score(model: Transformer, tokenizer: GGUFTokenizer, prompt: str, continuation: str) -> Score:
    """The teacher-forced loss of `continuation` given `prompt` (module docstring)."""
    toks = tokenize(tokenizer, prompt, continuation)
    logp = continuation_logprobs(model, toks.ids, toks.start)  # (C, V)
    target = torch.tensor(toks.ids[toks.start :])
    bits = float(-logp[torch.arange(len(target)), target].double().sum()) / math.log(2)
    return Score(bits, toks.n_bytes, len(target))


# -- variants and the cached loss matrices ----------------------------------------------------------------


def load_variant(variant: Variant) -> LoadedModel:
    """The variant loaded (models.runtime.load) and pruned. Raises what load raises (ModelNotPulled, ...)."""
    loaded = load(variant.model, quant=variant.quant)
    if variant.drop_layers:
        texts = [d.text for d in documents("calibration", limit=PRUNE_DOCS)]  # never evaluation text
        calib = windows(loaded.tokenizer, texts, PRUNE_TOKENS)
        prune_layers(loaded.model, variant.drop_layers, block_influence(loaded.model, calib))
    return loaded


def _cache_key(variant: Variant, split: str, reqs: Sequence[Request]) -> str:
    st = zoo.resolve(variant.model).resolve().stat()
    weights = f"{zoo.resolve(variant.model).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    text = hashlib.sha256(json.dumps([asdict(r) for r in reqs]).encode()).hexdigest()
    raw = json.dumps([FORMAT, asdict(variant), weights, split, text])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_path(variant: Variant, split: str, reqs: Sequence[Request]) -> Path:
    """Where the variant's losses on `reqs` are cached (whether or not they are yet)."""
    return zoo.cache_dir() / "moe2" / "losses" / f"{_cache_key(variant, split, reqs)}.npz"


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then move it into place: a crash leaves no
    half-written cache entry. The temporary name keeps `path`'s suffix (numpy appends it otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def variant_scores(
    variant: Variant, split: str, reqs: Sequence[Request], progress: Progress | None = None
) -> np.ndarray:
    """(R, 2) bits and scored bytes of the variant on each request, from the cache or computed (and
    cached). Computed on one torch thread: on two shared cores, two threads wait on each other."""
    path = cache_path(variant, split, reqs)
    if path.is_file():
        if progress:
            progress(len(reqs))
        return np.load(path)["scores"]
    loaded, threads = load_variant(variant), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = np.zeros((len(reqs), 2))
        for r, req in enumerate(reqs):
            s = score(loaded.model, loaded.tokenizer, req.prompt, req.continuation)
            out[r] = s.bits, s.n_bytes
            if progress:
                progress(1)
    finally:
        torch.set_num_threads(threads)
    write_atomic(path, lambda tmp: np.savez(tmp, scores=out))
    return out


@dataclass(frozen=True, eq=False)
class LossMatrix:
    """Every variant's loss on every request of one split."""

    expert_ids: tuple[str, ...]
    """(E,) the variants' ids, in column order."""
    tokenizers: tuple[str, ...]
    """(E,) each variant's tokenizer family (GatedObjective.tokenizers)."""
    losses: np.ndarray
    """(R, E) bits per byte of each request's continuation under each variant."""
    n_bytes: np.ndarray
    """(R,) UTF-8 bytes of each continuation (GatedObjective.n_bytes)."""


def loss_matrix(
    variants: Sequence[Variant], split: str, reqs: Sequence[Request], progress: Progress | None = None
) -> LossMatrix:
    """The (R, E) losses of `variants` on `reqs` (a split's requests), each column cached on its own."""
    cols = [variant_scores(v, split, reqs, progress) for v in variants]  # E x (R, 2)
    losses = np.stack([c[:, 0] / c[:, 1] for c in cols], axis=1)  # (R, E)
    n_bytes = np.array([r.n_bytes for r in reqs], dtype=np.float64)
    return LossMatrix(tuple(v.id for v in variants), tuple(v.family for v in variants), losses, n_bytes)
