"""Tiny random-weight GGUF files written with `gguf.GGUFWriter`, for fast tests of every code path.

Weights are drawn in the Hugging Face layout and written the way llama.cpp's converter writes real
files (llama Q/K rows permuted for interleaved RoPE, Gemma norms stored as 1 + w), so the loader
and an independent reader (transformers) see what they would see in a real file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CONTROL, BYTE = 3, 6


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    n_layers: int = 2
    dim: int = 64
    ffn_dim: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    context_length: int = 128
    sliding_window: int = 8
    quantize: bool = True
    """Store the MLP weights as Q8_0 (exercises dequantization); the rest stay F32."""
    attn_quant: str = ""
    """GGUF type of the attention projections ("": F32), e.g. "Q4_0": at quant "source" the
    model then mixes int4 with the MLP's int8 (models.source_quant)."""
    embd_quant: str = ""
    """GGUF type of the token embedding ("": F32), e.g. "Q8_0" (a QuantEmbedding at "source")."""
    seed: int = 0
    chat_template: str = ""
    """The llama vocabulary's chat template ("": CHATML)."""


def _byte_chars() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _gpt2_vocab(w: gguf.GGUFWriter, chat_template: str = "") -> int:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = specials + _byte_chars() + ["Ġt", "he", "Ġthe", "in", "Ġa"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([CONTROL] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template or CHATML)
    return len(tokens)


def _spm_vocab(w: gguf.GGUFWriter) -> int:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["▁", "▁t", "he", "▁the", "▁a", "in", *"abcdefghijklmnopqrstuvwxyz", "  "]
    tokens = specials + byte_tokens + pieces
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([CONTROL] * 4 + [BYTE] * 256 + [1] * len(pieces))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    return len(tokens)


def _permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (half-rotation rows -> interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a random model of `spec` to `path`; returns the path."""
    rng = np.random.default_rng(spec.seed)
    w = gguf.GGUFWriter(str(path), spec.arch)
    vocab = _gpt2_vocab(w, spec.chat_template) if spec.arch == "llama" else _spm_vocab(w)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    if spec.arch == "llama":
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(spec.head_dim)
    else:
        w.add_rope_freq_base(1_000_000.0)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
        w.add_sliding_window(spec.sliding_window)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    def add(name: str, data: np.ndarray, quantize: bool = False, as_type: str = "") -> None:
        kind = "Q8_0" if quantize and spec.quantize else as_type
        if kind:
            raw = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(data, raw), raw_dtype=raw)
        else:
            w.add_tensor(name, data)

    q_out, kv_out = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    add("token_embd.weight", rand(vocab, spec.dim, scale=0.5), as_type=spec.embd_quant)
    add("output_norm.weight", norm(spec.dim))
    for i in range(spec.n_layers):
        wq, wk = rand(q_out, spec.dim), rand(kv_out, spec.dim)
        if spec.arch == "llama":
            wq, wk = _permute(wq, spec.n_heads), _permute(wk, spec.n_kv_heads)
        add(f"blk.{i}.attn_norm.weight", norm(spec.dim))
        add(f"blk.{i}.attn_q.weight", wq, as_type=spec.attn_quant)
        add(f"blk.{i}.attn_k.weight", wk, as_type=spec.attn_quant)
        add(f"blk.{i}.attn_v.weight", rand(kv_out, spec.dim), as_type=spec.attn_quant)
        add(f"blk.{i}.attn_output.weight", rand(spec.dim, q_out), as_type=spec.attn_quant)
        add(f"blk.{i}.ffn_norm.weight", norm(spec.dim))
        add(f"blk.{i}.ffn_gate.weight", rand(spec.ffn_dim, spec.dim), quantize=True)
        add(f"blk.{i}.ffn_up.weight", rand(spec.ffn_dim, spec.dim), quantize=True)
        add(f"blk.{i}.ffn_down.weight", rand(spec.dim, spec.ffn_dim), quantize=True)
        if spec.arch == "gemma3":
            add(f"blk.{i}.attn_q_norm.weight", norm(spec.head_dim))
            add(f"blk.{i}.attn_k_norm.weight", norm(spec.head_dim))
            add(f"blk.{i}.post_attention_norm.weight", norm(spec.dim))
            add(f"blk.{i}.post_ffw_norm.weight", norm(spec.dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
