"""Load a model by zoo name or path, with a prepared-weights cache.

Parsing a GGUF with `gguf.GGUFReader` and dequantizing it costs 10-60 s on two cores (most of it
the reader walking a 262k-entry vocabulary). The first load therefore writes the dequantized
weights, the config and the tokenizer to `<cache>/prepared/<key>/`, keyed by the file's path, size
and modification time; later loads memory-map them in about a second. Writes are atomic, so a
crash leaves no half-written entry.

A GGUF loads at one of four precisions (`quant`): "fp32" (dequantized: the reference the tests
compare with transformers, and the default), "source" (each tensor at the precision the file stores
it at, on our int4/int8 kernels' grids: models.source_quant), "int8" or "int4" (the fp32 weights
quantized by models.quant.quantize_model, as `tandem optimize` does). Each has its own prepared
entry (the key holds the quant; a quantized entry stores its packed buffers and their layout, so a
later load rebuilds the modules empty and maps the buffers in).

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

from models import source_quant, zoo
from models.bundle import load_bundle
from models.config import ModelConfig
from models.cpu import prepare_cpu
from models.errors import InvalidRequest
from models.loaded import LoadedModel
from models.quant import quantize_model
from models.tokenizer import GGUFTokenizer, TokenizerInfo, tokenizer_from_metadata
from models.transformer import Transformer

# LoadedModel: its home is models.loaded
__all__ = ["PREPARED_FORMAT", "QUANTS", "LoadedModel", "load", "prepared_record"]

PREPARED_FORMAT = 1  # bump when the prepared layout or the model's parameter names change
QUANTS = ("fp32", "source", "int8", "int4")
"""Precisions a GGUF loads at (see the module docstring)."""


def _key(path: Path, quant: str = "fp32") -> str:
    st = path.stat()
    raw = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{PREPARED_FORMAT}"
    if quant != "fp32":  # the fp32 entry keeps the key it always had
        raw += f":{quant}:{source_quant.FORMAT}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _write_prepared(entry: Path, model: Transformer, tokenizer: GGUFTokenizer, quant: dict | None = None) -> None:
    """Write an entry atomically: fp32 weights, or with `quant` (its "label", "layout" and, for
    "source", "tensors") the quantized state dict as it is (packed codes, fp16 scales) and quant.json."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        state = model.state_dict() if quant else {k: v.float() for k, v in model.state_dict().items()}
        torch.save(state, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg)))
        (tmp / "tokenizer.json").write_text(tokenizer.backend.to_str())
        (tmp / "tokenizer_info.json").write_text(json.dumps(dataclasses.asdict(tokenizer.info)))
        if quant:
            (tmp / "quant.json").write_text(json.dumps(quant))
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not entry.is_dir():
            raise


def _read_prepared(entry: Path, dtype: torch.dtype) -> tuple[Transformer, GGUFTokenizer, str | None]:
    """The entry's model, tokenizer and quant label (None for an fp32 entry). Floating-point
    weights come back in `dtype`; quantized buffers as stored."""
    cfg = ModelConfig(**json.loads((entry / "config.json").read_text()))
    quant = json.loads((entry / "quant.json").read_text()) if (entry / "quant.json").is_file() else None
    with torch.device("meta"):
        model = Transformer(cfg)
        if quant:
            source_quant.apply_layout(model, quant["layout"])
    state = torch.load(entry / "weights.pt", mmap=True, weights_only=True)
    state = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    info = json.loads((entry / "tokenizer_info.json").read_text())
    info["eos_ids"] = tuple(info["eos_ids"])
    tok = GGUFTokenizer(Tokenizer.from_file(str(entry / "tokenizer.json")), TokenizerInfo(**info))
    return model, tok, quant["label"] if quant else None


def _check_quant(quant: str | None) -> None:
    if quant is not None and quant not in QUANTS:
        raise InvalidRequest(f"quant must be one of {', '.join(QUANTS)}; got {quant!r}")


def _bundle(path: Path, quant: str | None, prepare: bool) -> LoadedModel:
    """A bundle at its own precision; `quant` other than None, "source" or that precision is refused."""
    loaded = load_bundle(path, prepare=prepare)
    held = loaded.describe(path.name)["quant"]
    if quant not in (None, "source", held):
        raise InvalidRequest(
            f"{path} is a bundle of {held} weights and cannot be served as {quant}: load it with quant "
            f"{held!r} (or 'source'), or build a {quant} bundle with `tandem optimize`"
        )
    return loaded


def _build(path: Path, quant: str, use_cache: bool) -> tuple[Transformer, GGUFTokenizer, dict]:
    """The GGUF at `path` quantized as `quant` ("source", "int8" or "int4") in float32, and what
    quant.json records of it: its label and, for "source", how each tensor is served."""
    if quant != "source":
        base = load(path, use_cache=use_cache, prepare=False)  # the fp32 entry: the GGUF is read once
        return quantize_model(base.model, int(quant.removeprefix("int"))), base.tokenizer, {"label": quant}
    from models.gguf_loader import load_model  # gguf, yaml, sentencepiece: ~5 MB a bundle never needs

    model, file = load_model(path)
    tok = tokenizer_from_metadata(file.metadata)
    fp32_entry = zoo.cache_dir() / "prepared" / _key(path)
    if use_cache and not (fp32_entry / "weights.pt").is_file():  # read anyway: the fp32 entry costs a write
        _write_prepared(fp32_entry, model, tok)
    plan = source_quant.quantize_from_source(model, file)
    return model, tok, {"label": source_quant.label(plan), "tensors": [dataclasses.asdict(p) for p in plan]}


def prepared_record(name_or_path: str | Path, quant: str) -> dict | None:
    """What the prepared entry of a GGUF at `quant` ("source", "int8", "int4") records: its "label",
    "layout" and, for "source", "tensors" (each a models.source_quant.TensorPrecision as a dict);
    None until a load with the cache has written it."""
    entry = zoo.cache_dir() / "prepared" / _key(zoo.resolve(name_or_path), quant) / "quant.json"
    return json.loads(entry.read_text()) if entry.is_file() else None


def load(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
    prepare: bool = True,
    quant: str | None = None,
) -> LoadedModel:
    """Load a zoo model (already pulled), a GGUF file or a bundle directory (`tandem optimize`),
    on the CPU and, with `prepare`, prepared to serve there (models.cpu.prepare_cpu).

    `quant` (QUANTS; None: "fp32" for a GGUF) is the precision a GGUF is served at (see the module
    docstring); LoadedModel.quant says what was served. A bundle is served at its own precision:
    `quant` None, "source" or that precision, anything else refused.

    Raises UnknownModel, ModelNotPulled, GGUFError, UnsupportedArchitecture or BundleError with a
    message that says what to do, and InvalidRequest for an unknown `quant` or one a bundle does not hold.
    """
    _check_quant(quant)
    if Path(name_or_path).is_dir() and (Path(name_or_path) / "manifest.json").is_file():
        return _bundle(Path(name_or_path), quant, prepare)
    quant = quant or "fp32"
    path = zoo.resolve(name_or_path)
    entry = zoo.cache_dir() / "prepared" / _key(path, quant)
    label: str | None = None
    if use_cache and (entry / "weights.pt").is_file():
        model, tok, label = _read_prepared(entry, dtype)
    elif quant == "fp32":
        from models.gguf_loader import load_model  # gguf, yaml, sentencepiece: ~5 MB a bundle never needs

        model, file = load_model(path, dtype)
        tok = tokenizer_from_metadata(file.metadata)
        if use_cache:
            _write_prepared(entry, model, tok)
    else:
        model, tok, record = _build(path, quant, use_cache)
        label = record["label"]
        if use_cache:
            _write_prepared(entry, model, tok, {**record, "layout": source_quant.quant_layout(model)})
        for p in model.parameters():  # norms and dense layers; quantized buffers stay as they are
            p.data = p.data.to(dtype)
    return LoadedModel(prepare_cpu(model) if prepare else model, tok, path, quant=label)
