"""Load a model by zoo name or path, with a prepared-weights cache.

Parsing a GGUF with `gguf.GGUFReader` and dequantizing it costs 10-60 s on two cores (most of it
the reader walking a 262k-entry vocabulary). The first load therefore writes the dequantized
weights, the config and the tokenizer to `<cache>/prepared/<key>/`, keyed by the file's path, size
and modification time; later loads memory-map them in about a second. Writes are atomic, so a
crash leaves no half-written entry.

Loaded models come back prepared for the CPU (models.cpu.prepare_cpu) unless `prepare=False`:
for a model bound for another device, an exporter, or only its tokenizer and description.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer

from models import zoo
from models.bundle import load_bundle
from models.config import ModelConfig
from models.cpu import prepare_cpu
from models.loaded import LoadedModel
from models.tokenizer import GGUFTokenizer, TokenizerInfo, tokenizer_from_metadata
from models.transformer import Transformer

__all__ = ["PREPARED_FORMAT", "LoadedModel", "load"]  # LoadedModel: its home is models.loaded

PREPARED_FORMAT = 1  # bump when the prepared layout or the model's parameter names change


def _key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{PREPARED_FORMAT}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _write_prepared(entry: Path, model: Transformer, tokenizer: GGUFTokenizer) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        torch.save({k: v.float() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg)))
        (tmp / "tokenizer.json").write_text(tokenizer.backend.to_str())
        (tmp / "tokenizer_info.json").write_text(json.dumps(dataclasses.asdict(tokenizer.info)))
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not entry.is_dir():
            raise


def _read_prepared(entry: Path, dtype: torch.dtype) -> tuple[Transformer, GGUFTokenizer]:
    cfg = ModelConfig(**json.loads((entry / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(cfg)
    state = torch.load(entry / "weights.pt", mmap=True, weights_only=True)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    info = json.loads((entry / "tokenizer_info.json").read_text())
    info["eos_ids"] = tuple(info["eos_ids"])
    tok = GGUFTokenizer(Tokenizer.from_file(str(entry / "tokenizer.json")), TokenizerInfo(**info))
    return model, tok


def load(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32, use_cache: bool = True, prepare: bool = True
) -> LoadedModel:
    """Load a zoo model (already pulled), a GGUF file or a bundle directory (`tandem optimize`),
    on the CPU and, with `prepare`, prepared to serve there (models.cpu.prepare_cpu).

    Raises UnknownModel, ModelNotPulled, GGUFError, UnsupportedArchitecture or BundleError with a
    message that says what to do.
    """
    if Path(name_or_path).is_dir() and (Path(name_or_path) / "manifest.json").is_file():
        return load_bundle(name_or_path, prepare=prepare)
    path = zoo.resolve(name_or_path)
    entry = zoo.cache_dir() / "prepared" / _key(path)
    if use_cache and (entry / "weights.pt").is_file():
        model, tok = _read_prepared(entry, dtype)
    else:
        from models.gguf_loader import load_model  # gguf, yaml, sentencepiece: ~5 MB a bundle never needs

        model, file = load_model(path, dtype)
        tok = tokenizer_from_metadata(file.metadata)
        if use_cache:
            _write_prepared(entry, model, tok)
    return LoadedModel(prepare_cpu(model) if prepare else model, tok, path)
