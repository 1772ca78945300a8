"""Generation on tiny models: greedy against a plain argmax loop, stops, EOS, sampling, batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.generate import Generator
from models.loaded import LoadedModel
from models.sampling import SamplingParams, filter_logits
from models.tokenizer import GGUFTokenizer
from models.transformer import Step

PROMPT = "the cat sat in a hat"


def _argmax_loop(tiny: LoadedModel, ids: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence for every token, no cache reuse."""
    m, seq = tiny.model, list(ids)
    with torch.no_grad():
        for _ in range(n):
            m.setup_cache(1, len(seq))
            logits = m(torch.tensor([seq]), Step.at(0, len(seq)))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids) :]


def test_greedy_equals_argmax_loop(tiny: LoadedModel) -> None:
    gen = tiny.generator()
    out = gen.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == _argmax_loop(tiny, gen.encode_prompt(PROMPT), 12)
    assert out.finish_reason == "length"


def test_stream_pieces_join_to_decoded_text(tiny: LoadedModel) -> None:
    gen = tiny.generator()
    events = list(gen.stream([PROMPT], SamplingParams(max_tokens=16, ignore_eos=True)))
    assert len(events) == 16
    assert [e.finish_reason for e in events[:-1]] == [None] * 15
    text = "".join(e.text for e in events)
    assert text == tiny.tokenizer.decode([e.token_id for e in events])


def test_stop_string_truncates_and_finishes(tiny: LoadedModel) -> None:
    gen = tiny.generator()
    free = gen.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))[0].text
    assert len(free) >= 6, "the tiny model should produce some text"
    stop = free[3:6]
    cut = gen.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index(stop)]
    assert stop not in cut.text


def test_eos_ends_generation(tiny: LoadedModel) -> None:
    first = tiny.generator().generate([PROMPT], SamplingParams(max_tokens=1))[0].token_ids[0]
    info = dataclasses.replace(tiny.tokenizer.info, eos_ids=(first,))
    gen = Generator(tiny.model, GGUFTokenizer(tiny.tokenizer.backend, info))
    out = gen.generate([PROMPT], SamplingParams(max_tokens=10))[0]
    assert (out.token_ids, out.finish_reason, out.text) == ([first], "eos", "")


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny: LoadedModel) -> None:
    gen = tiny.generator()
    params = SamplingParams(max_tokens=32, temperature=8.0, seed=7, ignore_eos=True)
    a = gen.generate([PROMPT], params)[0].token_ids
    b = gen.generate([PROMPT], params)[0].token_ids
    c = gen.generate([PROMPT], dataclasses.replace(params, seed=8))[0].token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(tiny: LoadedModel) -> None:
    gen = tiny.generator()
    greedy = gen.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    sampled = gen.generate([PROMPT], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=1, ignore_eos=True))
    assert sampled[0].token_ids == greedy


def test_batch_equals_one_by_one(tiny: LoadedModel) -> None:
    gen = tiny.generator()
    prompts = [PROMPT, "a", "the the the the the the the"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    batched = [c.token_ids for c in gen.generate(prompts, params)]
    single = [gen.generate([p], params)[0].token_ids for p in prompts]
    assert batched == single


def test_generation_stops_at_the_context_end(tiny: LoadedModel) -> None:
    ctx = tiny.config.context_length
    out = tiny.generator().generate([[5] * (ctx - 3)], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    assert out.finish_reason == "length"


def test_chat_messages_use_the_template(tiny: LoadedModel) -> None:
    if tiny.tokenizer.info.chat_template is None:
        pytest.skip("the tiny gemma is a base model")
    gen = tiny.generator()
    ids = gen.encode_prompt([{"role": "user", "content": "hi"}])
    want = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tiny.tokenizer.encode(want)
    im_start = tiny.tokenizer.token_to_id("<|im_start|>")
    assert ids.count(im_start) == 2, "special tokens stay whole"


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    kept = torch.isfinite(filter_logits(logits, 0, 0.6))
    assert kept.tolist() == [[True, True, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False]]


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_continuation_equals_an_uninterrupted_run(tiny: LoadedModel, cut: int) -> None:
    """What failover relies on: stop after `cut` tokens, go on from them, get the same answer."""
    from models.generate import Continuation

    gen = tiny.generator()
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    whole = list(gen.stream([PROMPT], params))
    head = whole[:cut]
    delivered = "".join(e.text for e in head)
    cont = Continuation(tuple(e.token_id for e in head), len(delivered))
    rest = list(gen.stream([PROMPT], dataclasses.replace(params, max_tokens=16 - cut), [cont]))
    assert [e.token_id for e in head + rest] == [e.token_id for e in whole]
    assert delivered + "".join(e.text for e in rest) == "".join(e.text for e in whole)
