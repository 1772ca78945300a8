"""Model bundles: what `tandem optimize` writes, the agent loads and the flash tool ships.

A bundle is a directory:

    manifest.json        format, architecture, config, quantization layout, kept layers, checksums
    weights.pt           the state dict (quantized layers as their packed buffers)
    tokenizer.json       the tokenizer (tokenizers library format)
    tokenizer_info.json  BOS/EOS ids, BOS policy, chat template
    routers/r<ratio>/    optional: the model's layer-skipping routers (models.skip), checksummed
    kvpred/d<depth>/     optional: the model's KV predictors (models.kvpred), checksummed

The manifest's "kv_predictors" says what the predictors were trained for: {"depths", "base_model",
"quant", "n_layers", "aux_layers" and "data_sha256" (by depth, "%g"), "sha256" (by file)}. At load
they must be the bundle's own model's (its "source") at the precision and layer count it serves,
in the manifest and in the predictors' own files alike: BundleKVMismatch otherwise.

`load_bundle` checks the manifest and the SHA-256 of every file before building anything, so a
damaged or mismatched bundle is refused at load time with BundleError, never run.

The manifest's "quant" (format 3) is null for an fp32 model, else {"label", "layout"}: the label
LoadedModel.describe reports (e.g. "source(q4_k->int4,q6_k->int8)") and the layout of every
quantized module, models.source_quant.quant_layout's {name: [bits, group_size] | "embedding"}.
Per module, because a model served at its GGUF's precision mixes grids (Gemma 3's Q4_K_M: int4
beside int8, dense fp32 in a small GGUF); a module the layout does not name is dense. Format 2
bundles (one {bits, group_size, embeddings} for every block layer) still load.
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
from models.kvpred import KVMismatch, PredictorSet, PredictorSpec
from models.loaded import LoadedModel
from models.quant import quantize_model
from models.skip import RouterSet, RouterSpec
from models.source_quant import apply_layout, quant_layout
from models.tokenizer import GGUFTokenizer, TokenizerInfo
from models.transformer import Transformer

FORMAT = "tandem-bundle/3"  # 3: a per-module quantization layout (mixed bit widths)
FORMAT_2 = "tandem-bundle/2"  # int4 codes packed in GGUF's block order; one quantization for all layers
READS = (FORMAT, FORMAT_2)
FILES = ("weights.pt", "tokenizer.json", "tokenizer_info.json")


class BundleError(TandemModelError):
    """A bundle whose manifest or files do not match, or that this runtime cannot run."""


class BundleKVMismatch(BundleError, KVMismatch):
    """A bundle's KV predictors trained for another model, precision or layer count than its own."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _quant_of(loaded: LoadedModel) -> dict | None:
    """The manifest's "quant": None for a model with no quantized module, else its label and layout."""
    layout = quant_layout(loaded.model)
    return {"label": loaded.served_quant, "layout": layout} if layout else None


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
            "quant": _quant_of(loaded),
            "layers": [block.layer for block in model.layers],
            "sha256": {name: _sha256(tmp / name) for name in FILES},
        }
        if loaded.routers is not None:  # trained for this model as served: they travel with it
            loaded.routers.save(tmp / "routers")
            files = sorted(p.relative_to(tmp).as_posix() for p in (tmp / "routers").rglob("*") if p.is_file())
            manifest["routers"] = {"ratios": loaded.skip_ratios, "sha256": {f: _sha256(tmp / f) for f in files}}
        if loaded.predictors is not None:  # likewise its KV predictors
            manifest["kv_predictors"] = _save_predictors(loaded, tmp, source)
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


def bundle_files(manifest: dict) -> dict[str, str]:
    """Every file a bundle's manifest lists besides itself, relative path -> SHA-256: the weights and
    tokenizer, and the routers' and predictors' files under their subdirectories. What a copy of the
    bundle (a flash, an over-the-air update) must carry."""

    def listed(entry: object) -> dict:
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        return {str(k): v for k, v in sha.items()} if isinstance(sha, dict) else {}

    files = listed(manifest)
    for extra in ("routers", "kv_predictors"):
        files.update(listed(manifest.get(extra)))
    return files


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: no readable manifest.json ({exc})") from exc
    if manifest.get("format") not in READS:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, this runtime reads {', '.join(READS)}")
    return manifest


def _build(path: Path, manifest: dict, cfg: ModelConfig) -> Transformer:
    """The manifest's model, empty on the meta device. Raises BundleError for a quantization this
    runtime cannot build, naming the module for a format-3 layout."""
    quant = manifest.get("quant")
    # On the meta device: the fp32 weights a quantized bundle replaces, and the empty quantized
    # buffers the state dict replaces, are never allocated (they would count in peak RSS).
    with torch.device("meta"):
        model = Transformer(cfg, manifest["layers"])
        if quant is None:
            return model
        if manifest["format"] == FORMAT_2:
            return _build_format_2(path, model, quant)
        layout = quant.get("layout") if isinstance(quant, dict) else None
        if not isinstance(layout, dict):
            raise BundleError(f"{path}: quantization {quant} is not one this engine runs (a layout of int8, int4)")
        for name, spec in layout.items():
            _check_spec(path, name, spec)
            try:
                apply_layout(model, {name: spec})
            except (AttributeError, TypeError, ValueError, TandemModelError) as exc:
                raise BundleError(f"{path}: layout entry {name}: {spec} cannot be built ({exc})") from exc
    return model


def _check_spec(path: Path, name: str, spec: object) -> None:
    """A layout entry is "embedding" or [bits, group_size], bits 4 or 8. Raises BundleError."""
    if spec == "embedding":
        return
    fits = isinstance(spec, list) and len(spec) == 2 and all(type(v) is int for v in spec)
    if not fits or spec[0] not in (4, 8):
        raise BundleError(f"{path}: layout entry {name}: {spec} is not one this engine runs (int8, int4)")


def _build_format_2(path: Path, model: Transformer, quant: dict) -> Transformer:
    """A format-2 manifest's one quantization for every block layer, applied to `model`."""
    if quant.get("bits") not in (4, 8):
        raise BundleError(f"{path}: quantization {quant} is not one this engine runs (int8, int4)")
    try:
        embeddings = quant.get("embeddings", False)
        return quantize_model(model, quant["bits"], quant["group_size"], empty=True, embeddings=embeddings)
    except (KeyError, TypeError, TandemModelError) as exc:
        raise BundleError(f"{path}: quantization {quant} is not one this runtime can build ({exc})") from exc


def _misfit(model: Transformer, state: dict[str, torch.Tensor]) -> str | None:
    """The first module (in the model's order) whose saved tensors differ in name or shape from
    the empty model the manifest built (what load_state_dict checks: int4 codes are packed two a
    byte, so a layer's bits or group size show in its shapes); None when every tensor fits."""
    want = model.state_dict()
    for key in [*want, *(k for k in state if k not in want)]:
        a, b = want.get(key), state.get(key)
        if a is None or b is None or a.shape != b.shape:
            return key.rpartition(".")[0]
    return None


def load_bundle(path: str | Path, prepare: bool = True) -> LoadedModel:
    """Verify and load a bundle on the CPU and, with `prepare`, prepare it to serve there
    (models.cpu.prepare_cpu). Raises BundleError for any mismatch; one between the manifest's
    layout and the saved weights names the module."""
    path = Path(path)
    manifest = read_manifest(path)
    listed = {**dict.fromkeys(FILES), **bundle_files(manifest)}  # every file checked before anything is built
    for name, expected in listed.items():
        if not (path / name).is_file() or _sha256(path / name) != expected:
            raise BundleError(f"{path}: {name} is missing or does not match the manifest's checksum")
    try:
        cfg = ModelConfig(**manifest["config"])
    except (TypeError, TandemModelError) as exc:
        raise BundleError(f"{path}: manifest config is not a valid model config ({exc})") from exc
    if manifest.get("arch") != cfg.arch or len(manifest.get("layers", [])) != cfg.n_layers:
        raise BundleError(f"{path}: manifest arch/layers disagree with its config")
    model = _build(path, manifest, cfg)
    state = torch.load(path / "weights.pt", weights_only=True, mmap=True)
    # Checked before loading: load_state_dict's own message lists every mismatch, cut to fit.
    if (module := _misfit(model, state)) is not None:
        spec = manifest["quant"]  # format 2: one quantization for all
        if manifest["format"] == FORMAT:
            spec = (spec or {}).get("layout", {}).get(module.removesuffix(".linear"), "dense")
        raise BundleError(f"{path}: the weights of {module} do not fit the manifest's quantization of it ({spec})")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise BundleError(f"{path}: weights do not fit the manifest's model ({str(exc)[:300]})") from exc
    model.eval().requires_grad_(False)
    info = json.loads((path / "tokenizer_info.json").read_text())
    info["eos_ids"] = tuple(info["eos_ids"])
    tok = GGUFTokenizer(Tokenizer.from_file(str(path / "tokenizer.json")), TokenizerInfo(**info))
    loaded = LoadedModel(prepare_cpu(model) if prepare else model, tok, path, quant=_label(manifest))
    if manifest.get("routers"):
        loaded.routers = _routers(path, manifest["routers"], loaded)
    if manifest.get("kv_predictors"):
        loaded.predictors = _predictors(path, manifest["kv_predictors"], manifest.get("source"), loaded)
    return loaded


def _routers(path: Path, entry: dict, loaded: LoadedModel) -> RouterSet:
    """The bundle's layer-skipping routers, checked against its manifest's checksums and its own
    model (precision, layer count, width): BundleError naming what differs."""
    for name, expected in entry.get("sha256", {}).items():
        if not (path / name).is_file() or _sha256(path / name) != expected:
            raise BundleError(f"{path}: {name} is missing or does not match the manifest's checksum")
    try:
        trained_for = json.loads(next((path / "routers").glob("r*/routers.json")).read_text())["spec"]["model"]
        cfg = loaded.config
        return RouterSet.load(path / "routers", RouterSpec(trained_for, loaded.served_quant, cfg.n_layers, cfg.dim))
    except (StopIteration, OSError, ValueError, KeyError, TandemModelError) as exc:
        raise BundleError(f"{path}: its routers do not fit its model: {exc}") from exc


def _save_predictors(loaded: LoadedModel, tmp: Path, source: str) -> dict:
    """Write `loaded`'s KV predictors under tmp/kvpred; their manifest entry. Raises BundleKVMismatch
    for predictors trained for another model than `source` as `loaded` serves it."""
    ps = loaded.predictors
    assert ps is not None
    own = PredictorSpec.of(loaded.model, source, loaded.served_quant)
    if ps.spec != own:
        raise BundleKVMismatch(f"the KV predictors were trained for {ps.spec}, not for the bundle's model {own}")
    ps.save(tmp / "kvpred")
    files = sorted(p.relative_to(tmp).as_posix() for p in (tmp / "kvpred").rglob("*") if p.is_file())
    spec = {"base_model": ps.spec.model, "quant": ps.spec.quant, "n_layers": ps.spec.n_layers}
    return {**_by_depth(ps), **spec, "sha256": {f: _sha256(tmp / f) for f in files}}


def _by_depth(ps: PredictorSet) -> dict:
    """The manifest's "depths", "aux_layers" and "data_sha256" (what they were fitted on) of `ps`."""
    return {
        "depths": ps.depths,
        "aux_layers": {f"{d:g}": list(ps.by_depth[d].aux_layers) for d in ps.depths},
        "data_sha256": {f"{d:g}": ps.by_depth[d].record.get("data_sha256") for d in ps.depths},
    }


def _predictors(path: Path, entry: dict, source: object, loaded: LoadedModel) -> PredictorSet:
    """The bundle's KV predictors, checked against its manifest's checksums, then held to its own
    model as it serves it (the manifest's claims and the predictors' files alike): BundleError for a
    missing or damaged file, BundleKVMismatch naming what differs."""
    where = f"{path}/manifest.json kv_predictors"
    sums = entry.get("sha256")
    if not isinstance(sums, dict) or not sums:
        raise BundleError(f"{where}: no checksums for the KV predictors")
    for name, expected in sums.items():
        if not (path / name).is_file() or _sha256(path / name) != expected:
            raise BundleError(f"{path}: {name} is missing or does not match the manifest's checksum")
    cfg = loaded.config
    claims = {"base_model": source, "quant": loaded.served_quant, "n_layers": cfg.n_layers}
    wrong = [f"{k} {entry.get(k)!r} (the bundle's model: {v!r})" for k, v in claims.items() if entry.get(k) != v]
    if wrong:
        raise BundleKVMismatch(f"{where}: KV predictors trained for another model: {', '.join(wrong)}")
    try:
        ps = PredictorSet.load(path / "kvpred", PredictorSpec.of(loaded.model, str(source), loaded.served_quant))
    except KVMismatch as exc:
        raise BundleKVMismatch(f"{path}: its KV predictors do not fit its model: {exc}") from exc
    except TandemModelError as exc:
        raise BundleError(f"{path}: its KV predictors do not load: {exc}") from exc
    for key, value in _by_depth(ps).items():  # the manifest's account of them, as their files have it
        if entry.get(key) != value:
            raise BundleKVMismatch(f"{where}: {key} {entry.get(key)!r}, the predictors' files say {value!r}")
    return ps


def _label(manifest: dict) -> str | None:
    """The precision a format-3 manifest says its model serves at (None: read off the model)."""
    quant = manifest.get("quant")
    label = quant.get("label") if manifest["format"] == FORMAT and isinstance(quant, dict) else None
    return label if isinstance(label, str) else None
