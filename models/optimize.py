"""Make a smaller variant of a model and measure what it costs: `optimize` prunes and/or
quantizes, writes the variant as a bundle, and reports its size, decode speed and quality.

Quality is measured as everywhere in Tandem: bits per byte (BPB) of the corpus's evaluation
documents, and top-1 agreement with the unoptimised base; pruning ranks layers on calibration
documents, never the evaluation ones. Speed is batch-1 decode tokens per second on this machine's
CPU threads, after a short prefill.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.bundle import save_bundle
from models.corpus import documents
from models.cpu import prepare_cpu
from models.errors import InvalidRequest
from models.eval import agreement, bits_per_byte, windows
from models.loaded import LoadedModel
from models.prune import block_influence, prune_layers
from models.quant import quantize_model, weight_bytes
from models.tokenizer import GGUFTokenizer
from models.transformer import Step, Transformer

STAGES = ("prune", "quantize", "save", "evaluate")
"""What `optimize` reports to its `progress` callback, in order, as each finishes."""
CALIBRATION_DOCS, EVAL_DOCS, WINDOW_TOKENS = 8, 4, 256
PREFILL_TOKENS, DECODE_TOKENS = 16, 64


@dataclass(frozen=True)
class OptimizeReport:
    """What one `optimize` run wrote and measured."""

    bundle: Path
    """The bundle directory written."""
    size_bytes: int
    """Bytes of the bundle's files on disk."""
    weight_bytes: int
    """Bytes of the variant's weights as stored (quantized layers at their packed size)."""
    n_layers: int
    """Layers the variant has."""
    kept_layers: tuple[int, ...]
    """The base's indices of the layers kept, ascending (all of them without pruning)."""
    decode_tok_s: float
    """Batch-1 decode speed of the variant on this machine, tokens per second."""
    threads: int
    """torch CPU threads the speed was measured with."""
    bpb_base: float
    """Bits per byte of the evaluation text under the base model."""
    bpb_new: float
    """Bits per byte of the same text under the variant (lower is better)."""
    agreement: float
    """Share of evaluation positions where base and variant agree on the most likely next token."""

    @property
    def bpb_change(self) -> float:
        """Relative change of BPB against the base: +0.02 means 2% more bits per byte (worse)."""
        return self.bpb_new / self.bpb_base - 1


def _prune(model: Transformer, tokenizer: GGUFTokenizer, drop: int) -> list[int]:
    """Drop `drop` layers of `model` in place, ranked on calibration text; the kept layers."""
    if not drop:
        return list(range(model.cfg.n_layers))
    calib = windows(tokenizer, [d.text for d in documents("calibration", limit=CALIBRATION_DOCS)], WINDOW_TOKENS)
    return prune_layers(model, drop, block_influence(model, calib))


@torch.inference_mode()
def decode_speed(model: Transformer, tokens: int = DECODE_TOKENS) -> float:
    """Batch-1 decode tokens per second after a PREFILL_TOKENS prefill (overwrites the model's cache)."""
    model.setup_cache(1, PREFILL_TOKENS + tokens)
    model(torch.tensor([[1] * PREFILL_TOKENS]), Step.at(0, PREFILL_TOKENS))
    start = time.perf_counter()
    for i in range(tokens):
        model(torch.tensor([[5]]), Step.at(PREFILL_TOKENS + i, 1))
    return tokens / (time.perf_counter() - start)


def optimize(
    base: LoadedModel,
    out: Path,
    *,
    source: str | None = None,
    bits: int | None = 4,
    group_size: int | None = None,
    drop_layers: int = 0,
    decode_tokens: int = DECODE_TOKENS,
    progress: Callable[[str], None] | None = None,
) -> OptimizeReport:
    """Prune the `drop_layers` least influential layers, quantize to `bits` (None: keep fp32) with
    `group_size` (None: per channel for int8, 32 for int4), save the bundle at `out` (replaced if it
    exists; `source`, default the base's path, goes in its manifest) and measure it (speed over
    `decode_tokens` decode steps).

    Calls `progress(stage)` after each of STAGES. Raises InvalidRequest for bits other than None, 4
    or 8, a group size that does not fit, or `drop_layers` outside [0, n_layers); FileNotFoundError
    when the corpus (Debian's python3.11-doc) is not installed. Nothing is written when it raises.
    """
    if bits not in (None, 4, 8):
        raise InvalidRequest(f"quantization bits must be 4 or 8 (or none), got {bits}")
    step = progress or (lambda stage: None)
    # Read before anything is written: a missing corpus fails here, not after the bundle is saved.
    evals = windows(base.tokenizer, [d.text for d in documents("eval", limit=EVAL_DOCS)], WINDOW_TOKENS)
    model = copy.deepcopy(base.model)
    kept = _prune(model, base.tokenizer, drop_layers)
    step("prune")
    if bits:
        quantize_model(model, bits, group_size)
    prepare_cpu(model)  # packed for the kernels, as an agent serves it: the speed measured is that one
    step("quantize")
    bundle = save_bundle(LoadedModel(model, base.tokenizer, base.path), out, source=source or str(base.path))
    step("save")
    q_base, q_new = bits_per_byte(base.model, base.tokenizer, evals), bits_per_byte(model, base.tokenizer, evals)
    agree = agreement(base.model, model, evals)
    tok_s = decode_speed(model, decode_tokens)
    step("evaluate")
    return OptimizeReport(
        bundle=bundle,
        size_bytes=sum(f.stat().st_size for f in bundle.iterdir()),
        weight_bytes=weight_bytes(model),
        n_layers=model.cfg.n_layers,
        kept_layers=tuple(kept),
        decode_tok_s=tok_s,
        threads=torch.get_num_threads(),
        bpb_base=q_base.bpb,
        bpb_new=q_new.bpb,
        agreement=agree,
    )
