"""Quality of a model variant: bits per byte (BPB) of real text, and top-1 agreement with a base.

BPB = (sum over predicted tokens of -log2 p(token)) / (UTF-8 bytes those tokens spell), so models
with different tokenizers compare fairly. Agreement is teacher-forced: both models read the same
tokens and we count positions where their most likely next token is the same.
Text comes from the evaluation split of `models.corpus` (never the calibration documents).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.tokenizer import GGUFTokenizer
from models.transformer import Step, Transformer


@dataclass(frozen=True)
class Quality:
    bpb: float
    """Bits per UTF-8 byte of the evaluated text (lower is better)."""
    tokens: int
    """Predicted tokens scored."""
    bytes: int
    """UTF-8 bytes those tokens spell."""


@torch.inference_mode()
def _logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """(T, V) next-token logits for every position of one sequence."""
    model.setup_cache(1, len(ids))
    return model(torch.tensor([ids]), Step.at(0, len(ids)))[0].float()


def windows(tokenizer: GGUFTokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """The first max_tokens ids of each text (with BOS where the model wants one); short ones dropped."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text)[:max_tokens]
        if len(ids) >= 16:
            out.append(ids)
    return out


def bits_per_byte(model: Transformer, tokenizer: GGUFTokenizer, sequences: Sequence[list[int]]) -> Quality:
    bits, n_tokens, n_bytes = 0.0, 0, 0
    for ids in sequences:
        logp = torch.log_softmax(_logits(model, ids)[:-1], dim=-1)  # (T-1, V): predicts ids[1:]
        target = torch.tensor(ids[1:])
        bits += float(-logp[torch.arange(len(target)), target].sum()) / math.log(2)
        n_tokens += len(target)
        # Bytes the predicted tokens spell: the text of all tokens minus that of the first one.
        full = tokenizer.decode(ids, skip_special_tokens=False).encode()
        head = tokenizer.decode(ids[:1], skip_special_tokens=False).encode()
        n_bytes += len(full) - len(head)
    return Quality(bits / max(n_bytes, 1), n_tokens, n_bytes)


def agreement(base: Transformer, variant: Transformer, sequences: Sequence[list[int]]) -> float:
    """Fraction of positions where both models' top-1 next token is the same (teacher-forced)."""
    same = total = 0
    for ids in sequences:
        a, b = _logits(base, ids).argmax(-1), _logits(variant, ids).argmax(-1)
        same += int((a == b).sum())
        total += len(ids)
    return same / max(total, 1)
