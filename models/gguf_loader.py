"""Load a GGUF file into a `Transformer`.

The sequence is fixed: read and validate the file, build the config from its metadata, build the
model on the `meta` device, map each GGUF tensor name to a parameter name through `TENSOR_NAMES`
(data, not code), dequantize with `gguf.quants.dequantize`, load with `assign=True`, and fail
loudly if any parameter is left unset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from models.config import ModelConfig, config_from_metadata
from models.errors import GGUFError, UnsupportedArchitecture
from models.tokenizer import GGUFTokenizer, tokenizer_from_metadata
from models.transformer import Transformer

GGUF_MAGIC = b"GGUF"

# GGUF tensor name -> parameter name. Per-block names are relative to `blk.{i}.` / `layers.{i}.`.
TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
BLOCK_TENSOR_NAMES: dict[str, str] = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "attn_q_norm.weight": "attention.q_norm.weight",
    "attn_k_norm.weight": "attention.k_norm.weight",
    "post_attention_norm.weight": "post_attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w_gate.weight",
    "ffn_up.weight": "feed_forward.w_up.weight",
    "ffn_down.weight": "feed_forward.w_down.weight",
    "post_ffw_norm.weight": "post_ffn_norm.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# Arrays that are large and only the tokenizer needs; read lazily by `read_metadata(..., full=True)`.
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


@dataclass(frozen=True)
class GGUFFile:
    """A validated GGUF: its metadata (big tokenizer arrays included) and the open reader."""

    path: Path
    metadata: dict[str, Any]
    reader: gguf.GGUFReader

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture"))


def open_gguf(path: str | Path) -> GGUFFile:
    """Open and validate a GGUF file.

    Raises GGUFError for a missing, truncated or corrupt file (the message names the file and
    what is wrong), never a bare numpy or struct error.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path, "r")
        metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    except GGUFError:
        raise
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors on bad bytes
        raise GGUFError(f"{path}: corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise GGUFError(f"{path}: truncated; tensor {tensor.name} needs bytes up to {end}, file has {size}")
    return GGUFFile(path, metadata, reader)


def _field_value(field: gguf.ReaderField) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_config(file: GGUFFile) -> ModelConfig:
    names = {t.name for t in file.reader.tensors}
    return config_from_metadata(file.metadata, has_output="output.weight" in names)


def parameter_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to our parameter name; raises UnsupportedArchitecture if unknown."""
    if gguf_name in TENSOR_NAMES:
        return TENSOR_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in BLOCK_TENSOR_NAMES:
        return f"layers.{m.group(1)}.{BLOCK_TENSOR_NAMES[m.group(2)]}"
    raise UnsupportedArchitecture(f"GGUF tensor {gguf_name!r} has no counterpart in this model")


def dequantize_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in PyTorch's (out_features, in_features) order."""
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise UnsupportedArchitecture(f"tensor {tensor.name}: type {tensor.tensor_type.name} not supported") from exc
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    data = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
    return data if data.flags.writeable else data.copy()  # F32 tensors come back as read-only memmap views


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the row permutation llama.cpp's converter applies to llama Q/K weights.

    llama.cpp rotates interleaved pairs (x0,x1),(x2,x3)…; our RoPE rotates halves. The converter
    reordered each head's rows from [first half, second half] to interleaved; this puts them back.
    """
    out_dim = weight.shape[0]
    head_dim = out_dim // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def rows_in_model_order(gguf_name: str, rows: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """`rows` (O, ...) of GGUF tensor `gguf_name` (its weight, or any per-row data such as
    quantization scales) in our model's row order: llama's Q and K rows unpermuted, others as they are."""
    if cfg.arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        return unpermute_qk(rows, cfg.n_heads if gguf_name.endswith("attn_q.weight") else cfg.n_kv_heads)
    return rows


def load_state_dict(file: GGUFFile, cfg: ModelConfig, layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Dequantized parameters by our names. `layers` limits which blocks are read (all by default)."""
    wanted = set(range(cfg.n_layers)) if layers is None else set(layers)
    state: dict[str, torch.Tensor] = {}
    for tensor in file.reader.tensors:
        m = _BLOCK.match(tensor.name)
        if m and int(m.group(1)) not in wanted:
            continue
        data = rows_in_model_order(tensor.name, dequantize_tensor(tensor), cfg)
        state[parameter_name(tensor.name)] = torch.from_numpy(data)
    return state


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, GGUFFile]:
    """Load a whole model from a GGUF file. Raises GGUFError / UnsupportedArchitecture."""
    file = open_gguf(path)
    cfg = read_config(file)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_state_dict(file, cfg)
    expected = dict(model.named_parameters())
    for name, value in state.items():
        if name not in expected:
            raise UnsupportedArchitecture(f"{file.path}: tensor for {name} has no place in a {cfg.arch} model")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise GGUFError(
                f"{file.path}: {name} has shape {tuple(value.shape)}, config implies {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GGUFError(f"{file.path}: missing tensors for {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model, file


@lru_cache(maxsize=4)
def _cached_tokenizer(path: str, mtime_ns: int) -> GGUFTokenizer:
    return tokenizer_from_metadata(open_gguf(path).metadata)


def load_tokenizer(path: str | Path) -> GGUFTokenizer:
    """The tokenizer of the GGUF at `path`, cached per file version within the process."""
    return _cached_tokenizer(str(path), Path(path).stat().st_mtime_ns)
