"""Lossless self-speculative decoding (models.speculative, issue 21): greedy tokens identical to the
base model's, sampled tokens distributed as the base model's, adaptive draft length."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from models.cpu import prepare_cpu
from models.errors import InvalidRequest
from models.quant import quantize_model
from models.sampling import SamplingParams
from models.speculative import DraftLength, SelfSpeculative, distribution
from models.transformer import Step, Transformer
from tests.conftest import real_model
from tests.tiny import TinySpec, write_tiny_gguf


@torch.inference_mode()
def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The base model's greedy tokens, one plain decode step at a time."""
    model.setup_cache(1, len(prompt) + n + 1)
    h = model.forward_layers(model.embed(torch.tensor([prompt])), Step.at(0, len(prompt)))
    out = [int(model.head(h[0, -1]).argmax())]
    for t in range(n - 1):
        h = model.forward_layers(model.embed(torch.tensor([[out[-1]]])), Step.at(len(prompt) + t, 1))
        out.append(int(model.head(h[0, -1]).argmax()))
    return out


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    path = write_tiny_gguf(tmp_path_factory.mktemp("spec") / "six.gguf", TinySpec(arch="llama", n_layers=6))
    from models.runtime import load

    return prepare_cpu(quantize_model(load(path, use_cache=False).model, 4))


@pytest.mark.parametrize("k", [1, 3, 8, None])
def test_greedy_output_is_the_base_models_exactly(six: Transformer, k: int | None) -> None:
    prompt = torch.randint(0, six.cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(k or 0)).tolist()
    want = greedy(six, prompt, 40)
    spec = SelfSpeculative(six, frozenset({2, 3}), SamplingParams(max_tokens=40), DraftLength(fixed=k))
    assert list(spec.run(prompt, 40)) == want
    assert spec.stats.rounds > 0 and spec.stats.drafted > 0
    if k is None:  # adaptive: a plain step, then a round of 2 to measure drafting, then what pays
        assert spec.stats.ks[:2] == [0, 2] and spec.stats.plain > 0
    else:
        assert 0 < spec.stats.accepted < spec.stats.drafted, "a random model's drafts: neither all right nor all wrong"


def test_greedy_on_smollm2_held_out_prompts() -> None:
    """The real model on the agents' fast path, a subset of the benchmark's held-out prompts."""
    from models.corpus import documents

    served = real_model("smollm2-135m-instruct", "source")
    model = copy.deepcopy(served.model)
    texts = [d.text for d in documents("eval", limit=40)][::8]
    for text in texts:
        prompt = served.tokenizer.encode(text)[:64]
        want = greedy(model, prompt, 24)
        spec = SelfSpeculative(model, frozenset({13, 14, 17}), SamplingParams(max_tokens=24), DraftLength(fixed=4))
        assert list(spec.run(prompt, 24)) == want
        assert spec.stats.accepted > 0


def _chi2_pvalue(observed: Counter, expected: dict[int, float], n: int) -> float:
    """Pearson's chi-square test of counts against probabilities (cells under 5 expected pooled)."""
    cells = sorted(expected, key=lambda t: -expected[t])
    stat, df, pool_o, pool_e = 0.0, -1, 0.0, 0.0
    for t in cells:
        e = expected[t] * n
        if e < 5:
            pool_o, pool_e = pool_o + observed.get(t, 0), pool_e + e
            continue
        stat += (observed.get(t, 0) - e) ** 2 / e
        df += 1
    rest = n - sum(observed.get(t, 0) for t in cells)  # tokens no cell expects
    pool_o, pool_e = pool_o + rest, pool_e + 1e-9
    if pool_e >= 5 or pool_o:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-9)
        df += 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@torch.inference_mode()
def test_sampled_tokens_follow_the_base_models_distribution(six: Transformer) -> None:
    """The second token (the first one a round drafts and verifies), over 1,000 seeded runs, is
    distributed as the base model's exact marginal (chi-square p > 0.001), and not as the draft's
    (the same test fails for it: the check can fail)."""
    params = SamplingParams(max_tokens=3, temperature=0.7, top_k=6)
    prompt = [5, 17, 40, 99, 3, 250, 7]
    skip = frozenset({1, 2, 3})
    six.setup_cache(1, 16)
    h = six.forward_layers(six.embed(torch.tensor([prompt])), Step.at(0, 7))
    first = distribution(six.head(h[0, -1]), params)
    state = six.request_state()
    exact: dict[int, float] = {}
    draft: dict[int, float] = {}
    for t1 in torch.nonzero(first).flatten().tolist():
        for s, table in ((frozenset(), exact), (skip, draft)):
            six.bind(state)
            out = six.forward_layers(six.embed(torch.tensor([[t1]])), Step.at(7, 1), skip=s)
            p2 = distribution(six.head(out[0, -1]), params)
            for t2 in torch.nonzero(p2).flatten().tolist():
                table[t2] = table.get(t2, 0.0) + float(first[t1] * p2[t2])
    n, seen = 1000, Counter()
    for seed in range(n):
        spec = SelfSpeculative(six, skip, SamplingParams(**{**params.__dict__, "seed": seed}), DraftLength(fixed=2))
        tokens = list(spec.run(prompt, 3))
        seen[tokens[1]] += 1
    assert _chi2_pvalue(seen, exact, n) > 1e-3, (seen.most_common(6), sorted(exact.items(), key=lambda x: -x[1])[:6])
    assert _chi2_pvalue(seen, draft, n) < 1e-3, "the draft's own distribution passes too: the test cannot tell"


def test_the_draft_length_adapts_to_what_pays() -> None:
    """Cheap drafts that are always accepted: long drafts; drafts as dear as a verify pass: k = 0."""
    good = DraftLength(draft_ms=1.0, step_ms=10.0, acceptance=0.95, verify_ms={2: 11.0, 5: 12.0, 9: 14.0})
    assert good.choose() >= 4
    bad = DraftLength(draft_ms=9.5, step_ms=10.0, acceptance=0.3, verify_ms={2: 15.0, 3: 18.0})
    assert bad.choose() == 0
    bad.plain_since = bad.probe  # after `probe` plain tokens it measures the acceptance again
    assert bad.choose() == 2
    fresh = DraftLength()
    assert fresh.choose() == 0  # a plain step first: the cost to beat
    fresh.record_plain(10.0)
    assert fresh.choose() == 2  # then a round, to measure the drafts


def test_bad_draft_settings_are_clear_errors(six: Transformer) -> None:
    with pytest.raises(InvalidRequest, match="skip set"):
        SelfSpeculative(six, frozenset(), SamplingParams())
    with pytest.raises(InvalidRequest, match=r"draft length must be in \[0, 8\]"):
        SelfSpeculative(six, frozenset({1}), SamplingParams(), DraftLength(fixed=9))
    with pytest.raises(InvalidRequest, match="outside"):
        SelfSpeculative(six, frozenset({6}), SamplingParams())
    with pytest.raises(InvalidRequest, match="exceed the context"):
        list(SelfSpeculative(six, frozenset({1}), SamplingParams()).run([1, 2, 3], six.cfg.context_length))


@torch.inference_mode()
@pytest.mark.parametrize("start", [0, 2])
def test_a_verify_pass_is_plain_decode_bit_for_bit(six: Transformer, start: int) -> None:
    """forward_decode over T positions in one C call equals feeding them one at a time: every
    hidden state and every cache slot written, exactly (torch.equal, not allclose)."""
    ids = torch.randint(0, six.cfg.vocab_size, (1, 17), generator=torch.Generator().manual_seed(start))
    six.setup_cache(1, 20)
    six.forward_layers(six.embed(ids[:, :12]), Step.at(0, 12))
    low = six.forward_layers(six.embed(ids[:, 12:]), Step.at(12, 5), 0, start) if start else six.embed(ids[:, 12:])
    state = six.request_state()
    saved = [(c.k.clone(), c.v.clone()) for c in six.caches if c is not None]
    batched = six.forward_decode(low, 12, start)
    after = [(c.k.clone(), c.v.clone()) for c in six.caches if c is not None]
    for c, (k, v) in zip(six.caches, saved, strict=True):
        c.k.copy_(k)
        c.v.copy_(v)
    six.bind(state)
    one = torch.cat([six.forward_layers(low[:, t : t + 1], Step.at(12 + t, 1), start) for t in range(5)], dim=1)
    assert six.decoder is not None and six.decoder.built, "the kernels did not run"
    assert torch.equal(batched, one)
    assert all(torch.equal(c.k, k) and torch.equal(c.v, v) for c, (k, v) in zip(six.caches, after, strict=True))
