"""Our CPU kernels for quantized weights (kernels.c), compiled on first use and cached.

The C source is compiled with the machine's C compiler for the machine's own instruction set
(`-march=native`) into `<cache>/kernels/<key>/`, keyed by the source, the compiler and the CPU's
flags, so a cache shared between machines never runs code built for another CPU. The library is
loaded with ctypes; tensors are passed as raw pointers (contiguous, checked here).

`available()` says whether the kernels can be used; callers fall back to dequantize + dense matmul
when not (no compiler), and `reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]


class KernelUnavailable(RuntimeError):
    """The kernels cannot be built or loaded on this machine."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise KernelUnavailable("no C compiler found (install gcc, or set CC) to build Tandem's quantized kernels")
    return cc


def _torch_gomp() -> str | None:
    """torch's own libgomp, so our OpenMP regions share torch's thread pool."""
    lib = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return str(lib) if lib.is_file() else None


def _build(cache: Path, flags: Sequence[str] = FLAGS) -> Path:
    """The library built with `flags` (the last one must be -shared), compiled once per key."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        SOURCE.read_bytes() + version.encode() + _cpu_flags().encode() + " ".join(flags).encode()
    ).hexdigest()[:20]
    out = cache / "kernels" / key / "libtandemq.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "kernels.o", Path(tmp) / "libtandemq.so"
        gomp = _torch_gomp()
        steps = [[cc, *flags[:-1], "-c", str(SOURCE), "-o", str(obj)]]
        if gomp:  # link torch's libgomp by path instead of -fopenmp's system one
            steps.append([cc, "-shared", str(obj), "-o", str(lib), gomp, "-lm"])
        else:
            steps.append([cc, "-shared", "-fopenmp", str(obj), "-o", str(lib), "-lm"])
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                command = " ".join(cmd)
                raise KernelUnavailable(f"building the quantized kernels failed: {command}\n{done.stderr[-2000:]}")
        os.replace(lib, out)
    return out


@functools.cache
def _lib() -> ctypes.CDLL:
    from models.zoo import cache_dir

    return _load(_build(cache_dir()))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.tandem_qmatvec.argtypes = [i, p, p, p, i, i, i, i]
    lib.tandem_dequant.argtypes = [i, p, p, i, i, i]
    lib.tandem_qgemm.argtypes = [i, p, p, p, i, i, i, i]
    lib.tandem_layers.argtypes = [p, i, p, p, i, i]
    lib.tandem_layers_tokens.argtypes = [p, i, p, p, i, i, i]
    lib.tandem_rope_rows.argtypes = [p, p, p, i, i, i, i]
    lib.tandem_glu.argtypes = [p, p, ctypes.c_long, i, i]
    lib.tandem_dequant_rows.argtypes = [i, p, p, i, p, i, i]
    lib.tandem_rmsnorm_rows.argtypes = [p, p, p, i, i, ctypes.c_float, i]
    lib.tandem_prefill_attention.argtypes = [p, p, p, i, ctypes.c_long, p, i, i, i, i, i, ctypes.c_float, i, i]
    for fn in (
        lib.tandem_qmatvec,
        lib.tandem_dequant,
        lib.tandem_qgemm,
        lib.tandem_layers,
        lib.tandem_layers_tokens,
        lib.tandem_rope_rows,
        lib.tandem_glu,
        lib.tandem_prefill_attention,
        lib.tandem_rmsnorm_rows,
        lib.tandem_dequant_rows,
        lib.tandem_qgemm_integer,
    ):
        fn.restype = i
    return lib


class QWeight(ctypes.Structure):
    """A packed quantized weight as kernels.c reads it; the packed tensor must outlive the struct."""

    _fields_ = [
        ("bits", ctypes.c_int),
        ("rows", ctypes.c_int),
        ("cols", ctypes.c_int),
        ("packed", ctypes.c_void_p),
    ]


class LayerStep(ctypes.Structure):
    """One decoder layer's settings, weights and (per request) cache, as kernels.c reads them."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")),
        *((name, ctypes.c_int) for name in ("qk_norm", "sandwich", "gelu", "window")),
        *((name, ctypes.c_float) for name in ("eps", "query_scale", "attn_softcap")),
        *((name, QWeight) for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")),
        *(
            (name, ctypes.c_void_p)
            for name in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")
        ),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("max_len", ctypes.c_int),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("kv_half", ctypes.c_int),
    ]


def layers(
    steps: ctypes.Array,
    start: int,
    end: int,
    h: Tensor,
    position: int,
    skip: ctypes.Array | None = None,
    tokens: int = 1,
) -> None:
    """Run layers steps[start:end] (a ctypes array of LayerStep) on h (tokens * D,) float32 in
    place, for tokens at cache slots position, position+1, ...: one C call, one OpenMP region for
    all of them; each token's arithmetic is exactly what it gets alone (see kernels.c).
    skip: None, or one c_uint8 flag a layer of the whole array (len(steps)); flagged layers in
    the range neither run nor touch their caches (early layer skipping)."""
    if not 0 <= start <= end <= len(steps):
        raise ValueError(f"layer range [{start}, {end}) outside [0, {len(steps)})")
    if skip is not None and len(skip) != len(steps):
        raise ValueError(f"a skip mask of {len(skip)} flags for {len(steps)} layers")
    if start == end:
        return
    first = ctypes.addressof(steps) + start * ctypes.sizeof(LayerStep)
    mask = None if skip is None else ctypes.addressof(skip) + start
    if tokens < 1 or h.numel() != tokens * steps[start].dim:
        raise ValueError(f"{h.numel()} values for {tokens} tokens of width {steps[start].dim}")
    rc = _lib().tandem_layers_tokens(first, end - start, mask, h.data_ptr(), tokens, position, torch.get_num_threads())
    if rc == -2:
        raise MemoryError("the kernels could not allocate their scratch")
    if rc:
        raise ValueError(f"layers refused position {position} (caches of {steps[start].max_len} slots) or their shapes")


@functools.cache
def available() -> bool:
    try:
        _lib()
    except (KernelUnavailable, OSError):
        return False
    return True


def reason() -> str:
    """Why the kernels are unavailable ('' when they are)."""
    try:
        _lib()
    except (KernelUnavailable, OSError) as exc:
        return str(exc)
    return ""


BLOCK_BYTES = {4: 80, 8: 136}  # one 32-input block of four rows in the packed layout (kernels.c)


def pack(q: Tensor, scale: Tensor, minimum: Tensor | None, bits: int) -> Tensor:
    """A quantized weight in the kernels' packed layout: (ceil(O/4), I/32, BLOCK_BYTES) uint8, the
    last group of four rows padded with zero rows. q: (O, I/2) uint8 int4 codes or (O, I) int8
    codes; scale and minimum: (O, I/32) fp16, one per 32-input block (minimum for int4 only)."""
    if bits not in BLOCK_BYTES or scale.dtype != torch.float16 or (bits == 4) != (minimum is not None):
        raise ValueError(f"pack takes int4 (with fp16 minima) or int8 codes and fp16 scales, not int{bits}")
    if minimum is not None and minimum.dtype != torch.float16:
        raise ValueError("int4 minima must be float16")
    n, nb = scale.shape
    pad = -n % 4

    def grouped(t: Tensor) -> Tensor:  # (n, nb, k) bytes -> (n/4, nb, 4 * k): each block's 4 rows side by side
        t = t.contiguous().view(torch.uint8).reshape(n, nb, -1)
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t
        return t.reshape(-1, 4, nb, t.shape[-1]).transpose(1, 2).reshape(-1, nb, 4 * t.shape[-1])

    parts = [scale] + ([] if minimum is None else [minimum]) + [q]
    return torch.cat([grouped(t) for t in parts], dim=-1).contiguous()


def _check(packed: Tensor, bits: int, out_f: int, in_f: int) -> None:
    want = (-(-out_f // 4), in_f // 32, BLOCK_BYTES.get(bits, 0))
    if in_f % 32 or tuple(packed.shape) != want or packed.dtype != torch.uint8:
        raise ValueError(f"kernels refused a packed weight {tuple(packed.shape)} for ({out_f}, {in_f}) int{bits}")
    if not packed.is_contiguous() or packed.device.type != "cpu":
        raise ValueError("quantized kernels take contiguous CPU tensors")


def qmatvec(x: Tensor, packed: Tensor, bits: int, out_f: int) -> Tensor:
    """x (M, I) float32 -> (M, O) = x @ W^T for a packed quantized W (`pack`)."""
    x = x.contiguous().float()
    m, i = x.shape
    _check(packed, bits, out_f, i)
    y = torch.empty(m, out_f, dtype=torch.float32)
    rc = _lib().tandem_qmatvec(
        bits, packed.data_ptr(), x.data_ptr(), y.data_ptr(), m, out_f, i, torch.get_num_threads()
    )
    if rc:
        raise MemoryError("qmatvec could not allocate its scratch")
    return y


def qgemm(x: Tensor, packed: Tensor, bits: int, out_f: int) -> Tensor | None:
    """x (M, I) float32 -> (M, O) = x @ W^T for many tokens (prefill): integer dot products where
    the CPU has VNNI (`integer_prefill`), else fp32 over W dequantized inside the GEMM; None when
    the kernel does not take these shapes (O not a multiple of 16, no AVX2): the caller then
    dequantizes and runs a dense matmul."""
    x = x.contiguous().float()
    m, i = x.shape
    _check(packed, bits, out_f, i)
    y = torch.empty(m, out_f, dtype=torch.float32)
    rc = _lib().tandem_qgemm(bits, packed.data_ptr(), x.data_ptr(), y.data_ptr(), m, out_f, i, torch.get_num_threads())
    if rc == -2:
        raise MemoryError("qgemm could not allocate its weight panels")
    return None if rc else y


def integer_prefill() -> bool:
    """Whether qgemm multiplies the weights' integer codes by int16 activations (CPUs with AVX-512
    VNNI; the activation rounding of decode's row kernels), rather than fp32 FMAs over dequantized
    weights. TANDEM_QGEMM_FP32=1 in the environment chooses the fp32 path (an A/B switch)."""
    return bool(_lib().tandem_qgemm_integer())


def dequantize(packed: Tensor, bits: int, out_f: int, in_f: int) -> Tensor:
    """The (O, I) float32 weight of a packed quantized one."""
    _check(packed, bits, out_f, in_f)
    out = torch.empty(out_f, in_f, dtype=torch.float32)
    if _lib().tandem_dequant(bits, packed.data_ptr(), out.data_ptr(), out_f, in_f, torch.get_num_threads()):
        raise ValueError(f"dequantize refused weight ({out_f}, {in_f})")
    return out


def dequantize_rows(packed: Tensor, bits: int, out_f: int, in_f: int, rows: Tensor) -> Tensor:
    """Rows `rows` (int64, any shape) of a packed quantized weight: (*rows.shape, I) float32, the
    values `dequantize` gives them (embedding lookups: the rows of the packed table, so the
    mapped source table is never read again)."""
    _check(packed, bits, out_f, in_f)
    flat = rows.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.numel(), in_f, dtype=torch.float32)
    if _lib().tandem_dequant_rows(bits, packed.data_ptr(), flat.data_ptr(), flat.numel(), out.data_ptr(), out_f, in_f):
        raise IndexError(f"row ids must be in [0, {out_f})")
    return out.reshape(*rows.shape, in_f)


def _plain(*tensors: Tensor) -> bool:
    """Contiguous float32 CPU tensors that autograd does not track (the kernels write in place)."""
    return all(
        t.is_contiguous() and t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad
        for t in tensors
    )


def rope_(xs: tuple[Tensor, ...], cos: Tensor, sin: Tensor) -> bool:
    """Rotate-half RoPE in place on each x (T, H, hd) with rows cos, sin (T, hd). All or none:
    False (nothing touched) when the kernels cannot take every tensor; the caller then uses torch."""
    ok = available() and _plain(*xs, cos, sin)
    if not ok or any(x.dim() != 3 or cos.shape != (x.shape[0], x.shape[2]) for x in xs):
        return False
    for x in xs:
        t, h, hd = x.shape
        if _lib().tandem_rope_rows(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), t, h, hd, torch.get_num_threads()):
            raise ValueError(f"RoPE refused head width {hd}")
    return True


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """RMSNorm of each row of x (..., D) with `weight` (D,), float32 on CPU; None when the kernels
    cannot take these tensors (the caller then runs torch's)."""
    if not (available() and _plain(x, weight)) or weight.shape != x.shape[-1:]:
        return None
    out = torch.empty_like(x)
    d = x.shape[-1]
    rc = _lib().tandem_rmsnorm_rows(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // d, d, eps, torch.get_num_threads()
    )
    return None if rc else out


def glu_(gate: Tensor, up: Tensor, gelu: bool) -> bool:
    """gate <- act(gate) * up in place (SiLU, or tanh-GELU); False when the kernels cannot."""
    if not (available() and _plain(gate, up) and gate.shape == up.shape):
        return False
    return _lib().tandem_glu(gate.data_ptr(), up.data_ptr(), gate.numel(), int(gelu), torch.get_num_threads()) == 0


def prefill_attention(
    q: Tensor, keys: Tensor, values: Tensor, scale: float, start: int, window: int = 0
) -> Tensor | None:
    """Causal attention of T new tokens at positions start .. start + T - 1: q (T, H, hd) float32;
    keys, values (1, K, S, hd) views of one layer's cache (float32 or float16) holding slots
    [0, start + T); with window > 0 a query sees only the last `window` positions up to its own.
    Returns (T, H, hd), or None when the kernels cannot take these tensors (the caller then runs
    SDPA). No soft-cap."""
    t, h, hd = q.shape
    if not (available() and _plain(q)) or keys.dim() != 4 or keys.shape[0] != 1 or keys.dtype != values.dtype:
        return None
    if keys.dtype not in (torch.float16, torch.float32) or keys.device.type != "cpu":
        return None
    rows = keys.stride(1)  # the cache's slots a kv head: both views step over whole heads of it
    if keys.stride() != values.stride() or keys.stride()[2:] != (hd, 1) or rows % hd or keys.shape[2] < start + t:
        return None
    out = torch.empty_like(q)
    rc = _lib().tandem_prefill_attention(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.float16), rows // hd,
        out.data_ptr(), t, start, h, keys.shape[1], hd, scale, window, torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise MemoryError("prefill attention could not allocate its scratch")
    return None if rc else out
