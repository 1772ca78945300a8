"""Tokenizers built from a GGUF's embedded vocabulary, on the `tokenizers` library.

Two kinds, chosen by `tokenizer.ggml.model` through `TOKENIZER_BUILDERS`:
- "gpt2": byte-level BPE with the file's merges (SmolLM2). The `smollm` pre-tokenizer splits
  digits one by one before the GPT-2 split, as llama.cpp and the original tokenizer do.
- "llama": SentencePiece-style BPE with byte fallback (Gemma). The file has scores but no merges;
  merges are rebuilt from the vocabulary, ranked by the order tokens appear in the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from models.errors import GGUFError, UnsupportedArchitecture

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
SPIECE_SPACE = "\u2581"


@dataclass(frozen=True)
class TokenizerInfo:
    """What generation needs besides encode/decode."""

    bos_id: int | None
    """Beginning-of-sequence id, if the vocabulary has one."""
    eos_ids: tuple[int, ...]
    """Ids that end generation (EOS and, for chat models, the end-of-turn token)."""
    add_bos: bool
    """Whether a prompt starts with BOS."""
    chat_template: str | None
    """Jinja2 chat template from the file; None for base models (completion only)."""


class GGUFTokenizer:
    """Encode and decode text with the vocabulary of one GGUF file."""

    def __init__(self, backend: Tokenizer, info: TokenizerInfo) -> None:
        self.backend = backend
        self.info = info

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) stay whole."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add = self.info.add_bos if add_bos is None else add_bos
        if add and self.info.bos_id is not None:
            ids = [self.info.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`: a token may hold part of a
        UTF-8 character, which its decoded text cannot show). Special tokens: their text."""
        table = self.__dict__.get("_bytes")
        if table is None:
            table = self.__dict__["_bytes"] = _token_byte_table(self.backend)
        if not 0 <= token_id < len(table):
            raise ValueError(f"token id {token_id} is outside the vocabulary of {len(table)}")
        return table[token_id]


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_byte_table(tok: Tokenizer) -> list[bytes]:
    """Each id's bytes: byte-level BPE spells bytes in GPT-2's alphabet; SentencePiece spells spaces
    as U+2581 and falls back to <0xNN> tokens for single bytes."""
    size = tok.get_vocab_size(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    inverse = {c: b for b, c in _byte_alphabet().items()}
    out = []
    for i in range(size):
        t = tok.id_to_token(i) or ""
        if t in special:
            out.append(t.encode())
        elif byte_level:
            out.append(bytes(inverse[c] for c in t) if all(c in inverse for c in t) else t.encode())
        elif m := _BYTE_TOKEN.fullmatch(t):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(t.replace(SPIECE_SPACE, " ").encode())
    return out


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(meta: Mapping[str, Any]) -> Tokenizer:
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two tokens.

    Ranked by the merged token's position in the file (earlier merges first) and, among splits of
    one token, longer left piece first.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked: list[tuple[int, int, int, str, str]] = []
    for rank, tok in enumerate(tokens):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((rank, -len(left), -len(right), left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece(meta: Mapping[str, Any]) -> Tokenizer:
    # Gemma stores tokens made only of spaces with real spaces; the normalizer spells spaces as ▁.
    tokens = [SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(BPE(vocab=vocab, merges=spm_merges(tokens), unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", SPIECE_SPACE)]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


TOKENIZER_BUILDERS: dict[str, Callable[[Mapping[str, Any]], Tokenizer]] = {
    "gpt2": _byte_level,
    "llama": _sentencepiece,
}


def _add_special_tokens(tok: Tokenizer, meta: Mapping[str, Any]) -> None:
    """Control tokens become special (kept whole, skipped on decode); user-defined ones plain added."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    byte_level = meta.get("tokenizer.ggml.model") == "gpt2"
    alphabet = set(_byte_alphabet().values()) if byte_level else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=True)
        if kind == CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == USER_DEFINED
    ]
    tok.add_tokens([t for t in user if t.content in vocab])


def _eos_ids(meta: Mapping[str, Any], tok: Tokenizer) -> tuple[int, ...]:
    ids = []
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(int(eos))
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        ids.append(int(eot))
    # Chat templates end a turn with a token of their own; generation must stop there too.
    for marker in ("<|im_end|>", "<end_of_turn>"):
        found = tok.token_to_id(marker)
        if found is not None and found not in ids:
            ids.append(found)
    return tuple(ids)


def tokenizer_from_metadata(meta: Mapping[str, Any]) -> GGUFTokenizer:
    """Build the tokenizer a GGUF's metadata describes.

    Raises GGUFError if the vocabulary is missing, UnsupportedArchitecture for an unknown
    tokenizer model.
    """
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError("GGUF has no embedded vocabulary (tokenizer.ggml.tokens)")
    if kind not in TOKENIZER_BUILDERS:
        raise UnsupportedArchitecture(
            f"tokenizer model {kind!r} is not supported; supported: {', '.join(sorted(TOKENIZER_BUILDERS))}"
        )
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in meta and len(meta[key]) != len(meta["tokenizer.ggml.tokens"]):
            raise GGUFError(
                f"GGUF vocabulary is inconsistent: {key} has {len(meta[key])} entries for "
                f"{len(meta['tokenizer.ggml.tokens'])} tokens"
            )
    tok = TOKENIZER_BUILDERS[kind](meta)
    _add_special_tokens(tok, meta)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    info = TokenizerInfo(
        bos_id=None if bos is None else int(bos),
        eos_ids=_eos_ids(meta, tok),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        chat_template=meta.get("tokenizer.chat_template"),
    )
    return GGUFTokenizer(tok, info)
