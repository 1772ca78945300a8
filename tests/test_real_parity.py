"""The real zoo models against transformers loading the same GGUF files (independent reference).

Needs the `reference` extra and the pulled models (make test provides both). Each model is loaded
once per module; transformers takes 15-60 s per model here.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from models.corpus import documents
from models.sampling import SamplingParams
from models.transformer import Step
from tests.conftest import real_model

transformers = pytest.importorskip("transformers", reason="the reference extra (transformers) is not installed")
pytestmark = pytest.mark.real

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


@cache
def reference(name: str) -> tuple[object, object]:
    path = real_model(name).path
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if name.startswith("smollm2"):
        # transformers' GGUF converter ignores `tokenizer.ggml.pre = "smollm"` and so drops the
        # one-digit-at-a-time split that SmolLM2's own tokenizer.json and llama.cpp apply. Give the
        # reference that split; tests/test_llamacpp.py checks our ids against llama.cpp unchanged.
        from tokenizers import pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return model.eval(), tok


def _prompt_ids(name: str, n: int = 64) -> list[int]:
    text = documents("eval", limit=1)[0].text
    return real_model(name).tokenizer.encode(text)[:n]


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_reference(name: str) -> None:
    ours = real_model(name)
    ref_model, _ = reference(name)
    ids = torch.tensor([_prompt_ids(name)])
    ours.model.setup_cache(1, ids.shape[1])
    with torch.no_grad():
        got = ours.model(ids, Step.at(0, ids.shape[1]))
        want = ref_model(ids).logits
    diff = (got - want).abs()
    assert diff.max().item() < 1e-2, f"max |Δlogit| {diff.max().item():.2e}"
    assert diff.median().item() < 1e-3, f"median |Δlogit| {diff.median().item():.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_64_tokens_identical(name: str) -> None:
    ours = real_model(name)
    ref_model, _ = reference(name)
    ids = _prompt_ids(name)
    got = ours.generator().generate([ids], SamplingParams(max_tokens=64))[0].token_ids
    with torch.no_grad():
        out = ref_model.generate(
            torch.tensor([ids]), max_new_tokens=64, do_sample=False, top_k=None, top_p=None, temperature=None
        )
    want = out[0, len(ids) :].tolist()
    assert len(got) == 64, "the prompt should not end the answer early"
    assert got == want


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_matches_reference_on_100_documents(name: str) -> None:
    ours = real_model(name).tokenizer
    _, ref = reference(name)
    docs = documents("eval", limit=100)
    assert len(docs) == 100
    mismatched = [d.name for d in docs if ours.encode(d.text) != ref.encode(d.text)]
    assert mismatched == []
    not_round_trip = [d.name for d in docs if ours.decode(ours.encode(d.text, add_bos=False)) != d.text]
    assert not_round_trip == []
