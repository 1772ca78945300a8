"""Our transformer against transformers' independent implementation, on tiny random GGUF files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.loaded import LoadedModel
from models.transformer import Step

transformers = pytest.importorskip("transformers", reason="the reference extra (transformers) is not installed")


def _reference_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref.eval()
    with torch.no_grad():
        return ref(tokens).logits


def test_logits_match_transformers(tiny: LoadedModel, tiny_path: Path) -> None:
    # 20 tokens: longer than the tiny Gemma's sliding window (8), so the window mask matters.
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    tiny.model.setup_cache(1, 20)
    with torch.no_grad():
        ours = tiny.model(tokens, Step.at(0, 20))
    ref = _reference_logits(tiny_path, tokens)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
