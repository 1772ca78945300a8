"""Model bundles: what `tandem optimize` writes, the agent loads and the flash tool ships.

A bundle is a directory:

    manifest.json        format, architecture, config, quantization, kept layers, checksums
    weights.pt           the state dict (quantized layers as their packed buffers)
    tokenizer.json       the tokenizer (tokenizers library format)
    tokenizer_info.json  BOS/EOS ids, BOS policy, chat template

`load_bundle` checks the manifest and the SHA-256 of every file before building anything, so a
damaged or mismatched bundle is refused at load time with BundleError, never run.
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

from models.config import ModelConfig
from models.cpu import prepare_cpu
from models.errors import TandemModelError
from models.loaded import LoadedModel
from models.quant import QuantEmbedding, QuantLinear, quantize_model
from models.tokenizer import GGUFTokenizer, TokenizerInfo
from models.transformer import Transformer

FORMAT = "tandem-bundle/2"  # 2: int4 codes packed in GGUF's block order; int8 embedding
FILES = ("weights.pt", "tokenizer.json", "tokenizer_info.json")


class BundleError(TandemModelError):
    """A bundle whose manifest or files do not match, or that this runtime cannot run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _quant_of(model: Transformer) -> dict | None:
    layers = [m for m in model.layers.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    # group_size None: one group a row (int8 per channel), whatever each layer's width.
    per_channel = all(m.group_size == m.shape[1] for m in layers)
    return {
        "bits": layers[0].bits,
        "group_size": None if per_channel else layers[0].group_size,
        "embeddings": isinstance(model.tok_embeddings, QuantEmbedding),
    }


def save_bundle(loaded: LoadedModel, out: Path, source: str) -> Path:
    """Write `loaded` (possibly quantized and pruned) as a bundle directory, atomically."""
    model = loaded.model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".bundle-"))
    try:
        torch.save(model.state_dict(), tmp / "weights.pt")
        (tmp / "tokenizer.json").write_text(loaded.tokenizer.backend.to_str())
        (tmp / "tokenizer_info.json").write_text(json.dumps(dataclasses.asdict(loaded.tokenizer.info)))
        manifest = {
            "format": FORMAT,
            "source": source,
            "arch": model.cfg.arch,
            "config": dataclasses.asdict(model.cfg),
            "quant": _quant_of(model),
            "layers": [block.layer for block in model.layers],
            "sha256": {name: _sha256(tmp / name) for name in FILES},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def bundle_version(path: str | Path) -> str:
    """A bundle's version: the SHA-256 of its manifest.json, which holds every other file's checksum
    (what ModelInfo.version reports and an over-the-air update names). Raises OSError without one."""
    return _sha256(Path(path) / "manifest.json")


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: no readable manifest.json ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, this runtime reads {FORMAT!r}")
    return manifest


def load_bundle(path: str | Path, prepare: bool = True) -> LoadedModel:
    """Verify and load a bundle on the CPU and, with `prepare`, prepare it to serve there
    (models.cpu.prepare_cpu). Raises BundleError for any mismatch."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in FILES:
        expected = manifest.get("sha256", {}).get(name)
        if not (path / name).is_file() or _sha256(path / name) != expected:
            raise BundleError(f"{path}: {name} is missing or does not match the manifest's checksum")
    try:
        cfg = ModelConfig(**manifest["config"])
    except (TypeError, TandemModelError) as exc:
        raise BundleError(f"{path}: manifest config is not a valid model config ({exc})") from exc
    if manifest.get("arch") != cfg.arch or len(manifest.get("layers", [])) != cfg.n_layers:
        raise BundleError(f"{path}: manifest arch/layers disagree with its config")
    quant = manifest.get("quant")
    if quant is not None and quant.get("bits") not in (4, 8):
        raise BundleError(f"{path}: quantization {quant} is not one this engine runs (int8, int4)")
    # On the meta device: the fp32 weights a quantized bundle replaces, and the empty quantized
    # buffers the state dict replaces, are never allocated (they would count in peak RSS).
    with torch.device("meta"):
        model = Transformer(cfg, manifest["layers"])
        if quant is not None:
            try:
                embeddings = quant.get("embeddings", False)
                quantize_model(model, quant["bits"], quant["group_size"], empty=True, embeddings=embeddings)
            except (KeyError, TypeError, TandemModelError) as exc:
                raise BundleError(f"{path}: quantization {quant} is not one this runtime can build ({exc})") from exc
    state = torch.load(path / "weights.pt", weights_only=True, mmap=True)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise BundleError(f"{path}: weights do not fit the manifest's model ({str(exc)[:300]})") from exc
    model.eval().requires_grad_(False)
    info = json.loads((path / "tokenizer_info.json").read_text())
    info["eos_ids"] = tuple(info["eos_ids"])
    tok = GGUFTokenizer(Tokenizer.from_file(str(path / "tokenizer.json")), TokenizerInfo(**info))
    return LoadedModel(prepare_cpu(model) if prepare else model, tok, path)
