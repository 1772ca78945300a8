"""Our CPU kernels (models/kernels) against float64 references, and the one-call-per-layer decode
path (models/fast_decode) against the torch path on the same quantized weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from models import kernels
from models.cpu import prepare_cpu
from models.loaded import LoadedModel
from models.quant import QuantLinear, quantize_model
from models.transformer import Step

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.reason()}")


def _activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case error of int16 activations: half a step of each 32-input block times |w|."""
    step = x.abs().reshape(x.shape[0], -1, 32).amax(-1, keepdim=True) / 32767  # (M, I/32, 1)
    half = (step / 2).expand(-1, -1, 32).reshape(x.shape).double()
    return half @ w.abs().double().T + 1e-5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("out_f", "in_f", "group", "rows"), [(40, 576, 32, 1), (7, 96, 96, 3), (130, 1536, 64, 2), (3, 64, 32, 1)]
)
def test_qmatvec_matches_float64_within_the_activation_rounding(
    bits: int, out_f: int, in_f: int, group: int, rows: int
) -> None:
    gen = torch.Generator().manual_seed(out_f + bits)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    layer = QuantLinear(w, bits, group)
    x = torch.randn(rows, in_f, generator=gen) * 3
    x[0, :32] *= 100  # one loud block must not spoil the precision of the others
    packed = layer.kernel_view()
    assert packed is not None
    assert packed.shape == (-(-out_f // 4), in_f // 32, kernels.BLOCK_BYTES[bits])  # row groups of 4, padded
    got = kernels.qmatvec(x, packed, bits, out_f).double()
    dense = layer.dequantize().double()
    want = x.double() @ dense.T
    err = (got - want).abs()
    assert bool((err <= _activation_bound(x, dense)).all()), float(err.max())
    # Dequantizing the packed weight in C gives the weights torch computes, bit for bit.
    assert torch.equal(kernels.dequantize(packed, bits, out_f, in_f), layer.dequantize())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("tokens", "out_f", "in_f", "group"),
    [(37, 192, 576, 32), (512, 64, 1536, 128), (9, 16, 32, 32), (14, 32, 64, 32)],
)
@pytest.mark.parametrize("fp32", [False, True], ids=["auto", "fp32"])
def test_qgemm_matches_float64_within_its_rounding(
    bits: int, tokens: int, out_f: int, in_f: int, group: int, fp32: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill's GEMM (every tail of 6 and of 8 token rows included) against float64: fp32 over
    dequantized weights, or integer codes times int16 activations where the CPU has VNNI (the
    `fp32` case forces the former there)."""
    if fp32:
        monkeypatch.setenv("TANDEM_QGEMM_FP32", "1")
        assert not kernels.integer_prefill()
    gen = torch.Generator().manual_seed(tokens + bits)
    layer = QuantLinear(torch.randn(out_f, in_f, generator=gen) * 0.05, bits, group)
    x = torch.randn(tokens, in_f, generator=gen)
    x[0, :32] *= 100  # one loud block must not spoil the precision of the others
    got = kernels.qgemm(x, layer.kernel_view(), bits, out_f)
    assert got is not None
    dense = layer.dequantize().double()
    want = x.double() @ dense.T
    bound = 4 * in_f * torch.finfo(torch.float32).eps * (x.abs().double() @ dense.abs().T)  # n * eps * sum |x w|
    if kernels.integer_prefill():  # sum(code * xq) is exact; the activations' rounding is |code * d| a step
        scaled = layer.codes().reshape(out_f, -1, group).float() * layer.scale.float()  # code * d
        bound = bound + _activation_bound(x, scaled.reshape(out_f, in_f))
    assert bool(((got.double() - want).abs() <= bound).all()), float((got.double() - want).abs().max())
    # The layer runs it for more than MATVEC_ROWS tokens.
    torch.testing.assert_close(layer(x), got, atol=0, rtol=0)


def test_qgemm_declines_shapes_it_does_not_tile() -> None:
    """Output widths not a multiple of 16 go back to the caller (dequantize + matmul), not wrong sums."""
    layer = QuantLinear(torch.randn(40, 64), 4, 32)
    x = torch.randn(12, 64)
    assert kernels.qgemm(x, layer.kernel_view(), 4, 40) is None
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T, atol=1e-4, rtol=1e-4)


def test_kernels_refuse_widths_they_cannot_run() -> None:
    layer = QuantLinear(torch.randn(4, 64), 8, 64)
    packed = layer.kernel_view()
    with pytest.raises(ValueError, match="refused"):
        kernels.qmatvec(torch.randn(1, 48), packed, 8, 4)
    with pytest.raises(ValueError, match="refused"):
        kernels.qmatvec(torch.randn(1, 64), packed, 4, 4)  # int8 blocks read as int4
    with pytest.raises(ValueError, match="contiguous CPU"):
        strided = torch.zeros(136, 1, 2, dtype=torch.uint8).permute(1, 2, 0)  # packed's shape, not contiguous
        kernels.qmatvec(torch.randn(1, 64), strided, 8, 4)


def test_a_missing_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises((kernels.KernelUnavailable, OSError)):
        kernels._build(tmp_path)
    monkeypatch.delenv("CC")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.raises(kernels.KernelUnavailable, match="no C compiler"):
        kernels._build(tmp_path)


def _decode(model: torch.nn.Module, ids: torch.Tensor, fast: bool, steps: int, start: int = 0) -> torch.Tensor:
    """Prefill ids on the torch path, then decode `steps` tokens; (steps + 1, V) logits."""
    model.fast_decode = fast
    n = ids.shape[1] - steps
    model.setup_cache(1, ids.shape[1] + 1)
    out = [model(ids[:, :n], Step.at(0, n))[0, -1]]
    for t in range(n, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], Step.at(t, 1))[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize(("bits", "kv_dtype"), [(4, torch.float32), (8, torch.float32), (4, torch.float16)])
@torch.no_grad()
def test_fast_decode_equals_the_torch_path(tiny: LoadedModel, bits: int, kv_dtype: torch.dtype) -> None:
    """Both architectures (tiny llama, tiny gemma3 with sliding windows of 8 passed by 20 decode
    steps), the same quantized weights and cache dtype: one C call per layer against torch's ops."""
    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), bits))
    model.kv_dtype = kv_dtype
    ids = torch.randint(0, tiny.config.vocab_size, (1, 26), generator=torch.Generator().manual_seed(bits))
    torch_path = _decode(model, ids, fast=False, steps=20)
    assert not model.decoder.built  # the torch path never built it
    fast_path = _decode(model, ids, fast=True, steps=20)
    assert model.decoder.built, "the fast path did not run"
    assert model.caches[0].k.dtype == kv_dtype
    torch.testing.assert_close(fast_path, torch_path, atol=5e-4 * float(torch_path.abs().max()), rtol=1e-3)
    assert torch.equal(fast_path.argmax(-1), torch_path.argmax(-1))


@torch.no_grad()
def test_fast_decode_runs_layer_ranges(tiny: LoadedModel) -> None:
    """Split inference decodes layers [0, k) and [k, N) separately; the result equals one call."""
    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), 4))
    ids = torch.randint(0, tiny.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(9))
    n = tiny.config.n_layers
    results = []
    for cut in (None, 1, n - 2):
        model.setup_cache(1, 8)
        model.forward_layers(model.embed(ids[:, :5]), Step.at(0, 5))
        h = model.embed(ids[:, 5:6])
        for start, end in [(0, n)] if cut is None else [(0, cut), (cut, n)]:
            h = model.forward_layers(h, Step.at(5, 1), start, end)
        results.append(h)
    assert model.decoder.built
    for h in results[1:]:
        torch.testing.assert_close(h, results[0], atol=0, rtol=0)


@torch.no_grad()
def test_fast_decode_follows_replaced_weights(tiny: LoadedModel) -> None:
    """Loading other weights into the model rebuilds the kernels' view at the next request."""
    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), 4))
    ids = torch.randint(0, tiny.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    before = _decode(model, ids, fast=True, steps=2)
    state = model.state_dict()
    state["layers.0.attention.wq.scale"] = torch.zeros_like(state["layers.0.attention.wq.scale"])
    model.load_state_dict(state, assign=True)
    after = _decode(model, ids, fast=True, steps=2)
    assert not torch.allclose(after, before)
    want = _decode(model, ids, fast=False, steps=2)
    torch.testing.assert_close(after, want, atol=5e-4 * float(want.abs().max()), rtol=1e-3)


@torch.no_grad()
def test_fast_decode_refuses_slots_and_ranges_outside_the_cache(tiny: LoadedModel) -> None:
    """A slot past the cache or a layer range past the model is an error before any write."""
    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), 4))
    model.setup_cache(1, 4)
    decoder = model.decoder
    assert decoder is not None
    h = torch.randn(1, 1, tiny.config.dim)
    before = [c.k.clone() for c in model.caches]
    with pytest.raises(ValueError, match="refused position 4"):
        decoder.run(h, 4, 0, tiny.config.n_layers)
    with pytest.raises(ValueError, match="outside"):
        kernels.layers(decoder.steps, 0, tiny.config.n_layers + 1, h.reshape(-1).clone(), 0)
    assert all(torch.equal(c.k, b) for c, b in zip(model.caches, before, strict=True))


@torch.no_grad()
def test_portable_build_decodes_like_the_native_one(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built without -march=native (no AVX2, no F16C: the scalar code an ARM board such as a
    Jetson compiles), the kernels decode the same tokens, fp16 cache included."""
    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), 4))
    model.kv_dtype = torch.float16
    ids = torch.randint(0, tiny.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(2))
    native = _decode(model, ids, fast=True, steps=10)
    flags = [f for f in kernels.FLAGS if f != "-march=native"]
    portable = kernels._load(kernels._build(tmp_path, flags))
    monkeypatch.setattr(kernels, "_lib", lambda: portable)
    model.setup_cache(1, 4)  # a new decoder, built against the portable library
    scalar = _decode(model, ids, fast=True, steps=10)
    torch.testing.assert_close(scalar, native, atol=5e-4 * float(native.abs().max()), rtol=1e-3)
    assert torch.equal(scalar.argmax(-1), native.argmax(-1))


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int, window: int = 0
) -> torch.Tensor:
    """float64 causal attention: q (T, H, hd), k/v (K, S, hd); query t sits at position start + t
    and sees the last `window` positions up to its own (all of them with window 0)."""
    t, h, _ = q.shape
    rep = h // k.shape[0]
    k, v = k.double().repeat_interleave(rep, 0), v.double().repeat_interleave(rep, 0)  # (H, S, hd)
    scores = torch.einsum("thd,hsd->hts", q.double(), k) * scale
    gap = start + torch.arange(t)[:, None] - torch.arange(k.shape[1])[None, :]  # (T, S) query minus key position
    seen = (gap >= 0) & ((gap < window) if window else True)
    weights = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
    return torch.einsum("hts,hsd->thd", weights, v)


@pytest.mark.parametrize(
    ("tokens", "heads", "kv_heads", "hd", "start", "window", "dtype"),
    [(512, 9, 3, 64, 0, 0, torch.float16), (37, 9, 3, 64, 0, 0, torch.float32), (45, 4, 1, 256, 0, 0, torch.float16),
     (20, 4, 2, 32, 13, 0, torch.float32), (70, 4, 1, 64, 30, 16, torch.float16)],
)  # fmt: skip
def test_prefill_attention_matches_float64(
    tokens: int, heads: int, kv_heads: int, hd: int, start: int, window: int, dtype: torch.dtype
) -> None:
    """Causal GQA attention straight from a cache (float32 or fp16, longer than the prompt), every
    block of 32 queries and tail, against float64; queries may start past slot 0 (a prompt's later
    piece), and a sliding window may hide the oldest keys."""
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, heads, hd, generator=gen)
    cache_k, cache_v = (torch.randn(1, kv_heads, start + tokens + 9, hd, generator=gen).to(dtype) for _ in range(2))
    keys, values = cache_k[:, :, : start + tokens], cache_v[:, :, : start + tokens]
    got = kernels.prefill_attention(q, keys, values, hd**-0.5, start, window)
    assert got is not None
    want = _reference_attention(q, keys[0], values[0], hd**-0.5, start, window)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_prefill_attention_declines_what_it_cannot_read() -> None:
    q = torch.randn(8, 4, 64)
    cache = torch.randn(1, 2, 16, 64)
    assert kernels.prefill_attention(q.transpose(0, 1).contiguous().transpose(0, 1), cache, cache, 0.125, 0) is None
    assert kernels.prefill_attention(q, cache.transpose(2, 3), cache.transpose(2, 3), 0.125, 0) is None
    assert kernels.prefill_attention(q, cache[:, :, :4], cache[:, :, :4], 0.125, 0) is None  # fewer slots than queries
    assert kernels.prefill_attention(q, cache.half(), cache, 0.125, 0) is None  # mixed dtypes


@pytest.mark.parametrize("bits", [None, 4])
@torch.no_grad()
def test_long_prompts_run_in_pieces_like_one_pass(tiny: LoadedModel, bits: int | None, monkeypatch) -> None:
    """A prompt longer than PREFILL_CHUNK runs piece by piece (the later pieces attend to the
    cache through the C kernel with an offset, past tiny gemma's sliding window of 8): the same
    logits and the same cache as one pass through torch's attention."""
    import models.transformer as transformer

    model = copy.deepcopy(tiny.model) if bits is None else quantize_model(copy.deepcopy(tiny.model), bits)
    ids = torch.randint(0, tiny.config.vocab_size, (1, 29), generator=torch.Generator().manual_seed(5))

    def prefill(chunk: int, kernel: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with monkeypatch.context() as patch:
            patch.setattr(transformer, "PREFILL_CHUNK", chunk)
            if not kernel:
                patch.setattr(kernels, "prefill_attention", lambda *a, **k: None)
            model.setup_cache(1, 32)
            logits = model(ids, Step.at(0, ids.shape[1]))[0]
            return logits, [c.k.clone() for c in model.caches]

    # Pieces of 10, 10, 9: more than MATVEC_ROWS each, so every piece runs the GEMMs.
    runs = [prefill(4096, kernel=False), prefill(10, kernel=True)]
    (whole, whole_k), (pieces, pieces_k) = runs
    torch.testing.assert_close(pieces, whole, atol=2e-4 * float(whole.abs().max()), rtol=1e-4)
    assert torch.equal(pieces.argmax(-1), whole.argmax(-1))
    for a, b in zip(pieces_k, whole_k, strict=True):  # relative to the largest: int16 activations round per block
        torch.testing.assert_close(a, b, atol=2e-4 * float(b.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 576), (300, 640), (2, 3, 7, 256), (5, 40)])
def test_rmsnorm_rows_match_torch(shape: tuple[int, ...]) -> None:
    """The C norm over rows (widths with and without a tail of 8) against torch's fused one."""
    gen = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(*shape, generator=gen) * 3, torch.randn(shape[-1], generator=gen)
    got = kernels.rmsnorm(x, w, 1e-6)
    assert got is not None and got.shape == x.shape
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-6), atol=1e-5, rtol=1e-5)
    assert kernels.rmsnorm(x.double(), w.double(), 1e-6) is None  # not float32: torch's path


@torch.no_grad()
def test_the_decoder_follows_new_caches_and_keeps_no_old_one_alive(tiny: LoadedModel) -> None:
    """The decoder binds to a request's caches by weak reference: a new request's caches (which
    may reuse a freed one's address) are bound afresh, and a released cache is freed at once."""
    import gc
    import weakref

    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), 4))
    ids = torch.randint(0, tiny.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    first = _decode(model, ids, fast=True, steps=3)
    old = weakref.ref(model.caches[0])
    model.setup_cache(1, 8)  # the first request's caches are dropped here
    gc.collect()
    assert old() is None, "the decoder kept a released cache alive"
    again = _decode(model, ids, fast=True, steps=3)  # new caches, possibly at the old addresses
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(
        again, _decode(model, ids, fast=False, steps=3), atol=5e-4 * float(first.abs().max()), rtol=1e-3
    )


@torch.no_grad()
def test_a_copy_of_a_prepared_model_decodes_with_a_decoder_of_its_own(tiny: LoadedModel) -> None:
    """A deep copy of a model whose decoder has run gets a fresh decoder over the copy's weights
    (the built C array holds pointers, which neither can nor should be copied), decoding the same."""
    model = prepare_cpu(quantize_model(copy.deepcopy(tiny.model), 4))
    ids = torch.randint(0, tiny.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    want = _decode(model, ids, fast=True, steps=3)
    twin = copy.deepcopy(model)
    assert twin.decoder is not model.decoder and twin.decoder.model is twin and not twin.decoder.built
    torch.testing.assert_close(_decode(twin, ids, fast=True, steps=3), want, atol=0, rtol=0)
    assert twin.decoder.built


def test_embedding_rows_come_from_the_packed_table_exactly() -> None:
    """Embedding lookups read the head's packed copy: the same floats as the int8 table's own
    rows, and an id outside the table is an IndexError, as torch's indexing would be."""
    from models.quant import QuantEmbedding

    table = QuantEmbedding(torch.randn(1000, 96, generator=torch.Generator().manual_seed(1)))
    ids = torch.tensor([[3, 999, 0], [5, 5, 7]])
    lin = table.linear
    want = (lin.q[ids].float().reshape(2, 3, 3, 32) * lin.scale[ids].float()).reshape(2, 3, 96)
    assert torch.equal(table(ids), want)
    with pytest.raises(IndexError, match=r"\[0, 1000\)"):
        table(torch.tensor([[1000]]))
