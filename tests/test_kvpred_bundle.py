"""Bundles carry a model's KV predictors (models.bundle, models.kvpred): checksummed, and held at load
to the bundle's own model as it serves it (base model, precision, layer count); a flash payload takes
the predictors trained for the model it ships."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from models import kvpred, kvpred_train
from models.bundle import BundleError, BundleKVMismatch, bundle_version, load_bundle, save_bundle
from models.loaded import LoadedModel
from models.runtime import load
from models.sampling import SamplingParams
from tests.tiny import TinySpec, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

AUX = {0.25: (0, 5), 0.5: (0, 2, 5)}


@pytest.fixture(scope="module")
def six_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("six") / "six.gguf", TinySpec(arch="llama", n_layers=6))


def predictors(loaded: LoadedModel, name: str) -> kvpred.PredictorSet:
    """Least-squares predictors at two depths for `loaded` served as `name`, on random windows."""
    rng = random.Random(0)
    windows = [[rng.randrange(loaded.config.vocab_size) for _ in range(48)] for _ in range(4)]
    spec = kvpred.PredictorSpec.of(loaded.model, name, loaded.served_quant)
    record = {"data_sha256": kvpred_train.data_sha256(windows), "quality": {"agreement": 0.9, "bpb_ratio": 1.05}}
    fitted = kvpred_train.fit(loaded.model, spec, windows, AUX)
    return kvpred.PredictorSet({d: dataclasses.replace(p, record=record) for d, p in fitted.items()})


@pytest.fixture(scope="module")
def six(six_path: Path) -> LoadedModel:
    loaded = load(six_path, use_cache=False)
    loaded.predictors = predictors(loaded, "six")
    return loaded


@pytest.fixture
def bundle(six: LoadedModel, tmp_path: Path) -> Path:
    return save_bundle(six, tmp_path / "b", "six")


def edit_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["kv_predictors"].update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def greedy(loaded: LoadedModel, depth: float) -> list[int]:
    prompt = list(range(40, 80))
    params = SamplingParams(max_tokens=8, kv_prediction=depth, ignore_eos=True)
    return loaded.generator().generate([prompt], params)[0].token_ids


def test_a_bundle_round_trip_keeps_the_predictors(six: LoadedModel, bundle: Path) -> None:
    entry = json.loads((bundle / "manifest.json").read_text())["kv_predictors"]
    assert entry["depths"] == [0.25, 0.5] and (entry["base_model"], entry["quant"], entry["n_layers"]) == (
        "six",
        six.served_quant,
        6,
    )
    assert entry["aux_layers"] == {"0.25": [0, 5], "0.5": [0, 2, 5]}
    assert set(entry["data_sha256"].values()) == {six.predictors.by_depth[0.25].record["data_sha256"]}
    assert sorted(entry["sha256"]) == [f"kvpred/d{d}/predictors.{x}" for d in ("0.25", "0.5") for x in ("json", "pt")]
    back = load_bundle(bundle, prepare=False)
    assert back.predictors is not None and back.predictors.depths == [0.25, 0.5]
    for depth, p in six.predictors.by_depth.items():
        q = back.predictors.for_depth(depth)
        assert (q.spec, q.aux_layers, q.sources, q.record) == (p.spec, p.aux_layers, p.sources, p.record)
        assert all(torch.equal(a, b) for a, b in zip(q.weights, p.weights, strict=True))
    assert back.kv_variants == six.kv_variants
    assert back.attach_predictors("six") == "KV prediction at depths 0.25, 0.5 (its bundle's)"  # what an agent keeps
    assert greedy(back, 0.25) == greedy(six, 0.25)


@pytest.mark.parametrize(
    ("field", "claim"), [("quant", "int4"), ("base_model", "smollm2-135m-instruct"), ("n_layers", 30)]
)
def test_a_manifest_claiming_another_model_is_refused(bundle: Path, field: str, claim: object) -> None:
    edit_manifest(bundle, **{field: claim})
    message = rf"manifest.json kv_predictors: KV predictors trained for another model: {field} {claim!r}"
    with pytest.raises(BundleKVMismatch, match=message) as info:
        load_bundle(bundle, prepare=False)
    assert isinstance(info.value, kvpred.KVMismatch) and isinstance(info.value, BundleError)


def test_predictor_files_for_another_precision_are_refused(bundle: Path) -> None:
    """The manifest left as it was, the predictors' own file trained for int4 (checksum made to match)."""
    name = "kvpred/d0.5/predictors.json"
    meta = json.loads((bundle / name).read_text())
    meta["spec"]["quant"] = "int4"
    (bundle / name).write_text(json.dumps(meta))
    edit_manifest(bundle, sha256={**_sums(bundle), name: hashlib.sha256((bundle / name).read_bytes()).hexdigest()})
    with pytest.raises(BundleKVMismatch, match=r"KV predictors do not fit its model: .*quant 'int4'"):
        load_bundle(bundle, prepare=False)
    # and the manifest's account of them must be theirs: a depth it lists with other layers is refused
    meta["spec"]["quant"] = json.loads((bundle / "manifest.json").read_text())["kv_predictors"]["quant"]
    (bundle / name).write_text(json.dumps(meta))
    edit_manifest(bundle, sha256={**_sums(bundle), name: hashlib.sha256((bundle / name).read_bytes()).hexdigest()})
    edit_manifest(bundle, aux_layers={"0.25": [0, 5], "0.5": [0, 3, 5]})
    with pytest.raises(BundleKVMismatch, match=r"kv_predictors: aux_layers .*the predictors' files say"):
        load_bundle(bundle, prepare=False)


def _sums(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["kv_predictors"]["sha256"]


def test_a_corrupted_predictors_file_is_refused_by_checksum(bundle: Path) -> None:
    weights = bundle / "kvpred" / "d0.25" / "predictors.pt"
    data = bytearray(weights.read_bytes())
    data[-40] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"kvpred/d0.25/predictors.pt is missing or does not match the manifest's"):
        load_bundle(bundle, prepare=False)
    weights.unlink()
    with pytest.raises(BundleError, match=r"kvpred/d0.25/predictors.pt is missing"):
        load_bundle(bundle, prepare=False)


def test_predictors_for_another_model_are_not_bundled(six: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(BundleKVMismatch, match="not for the bundle's model"):
        save_bundle(six, tmp_path / "b", "another")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".bundle-*"))


def test_a_flash_payload_takes_the_predictors_trained_for_its_model(
    six_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flashing.payload import _save_checked

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    name = str(six_path)
    served = load(six_path, quant="fp32", use_cache=False)
    trained = predictors(served, name)
    trained.save(kvpred.kv_dir(name, served.served_quant))
    _save_checked(name, "fp32", tmp_path / "with")
    back = load_bundle(tmp_path / "with", prepare=False)
    assert back.predictors is not None and back.kv_variants == trained.variants()
    meta_path = kvpred.kv_dir(name, served.served_quant) / "d0.25" / "predictors.json"
    meta = json.loads(meta_path.read_text())
    meta["spec"]["n_layers"] = 2  # predictors of another layer count: the flash goes without them
    meta_path.write_text(json.dumps(meta))
    _save_checked(name, "fp32", tmp_path / "without")
    assert load_bundle(tmp_path / "without", prepare=False).predictors is None


def test_bundle_caches_key_on_what_is_trained_for_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training routers or predictors for a model changes the key flash and over-the-air bundle
    caches use (a bundle built before them would ship without them); another model's do not."""
    from cloud_hub.updates import BundleCache
    from models import zoo

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    cache = BundleCache(tmp_path / "bundles")
    before, untrained = zoo.trained_stamp("m"), cache.path(gguf, "source", "m")
    other = zoo.trained_dir("kvpred", "mm", "source") / "d0.5"
    other.mkdir(parents=True)
    (other / "predictors.json").write_text("{}")
    assert zoo.trained_stamp("m") == before  # "mm-..." is another model's
    mine = zoo.trained_dir("kvpred", "m", "int4") / "d0.5"
    mine.mkdir(parents=True)
    (mine / "predictors.json").write_text("{}")
    after = zoo.trained_stamp("m")
    assert after != before and cache.path(gguf, "source", "m") != untrained
    routers = zoo.trained_dir("routers", "m", "int4") / "r0.2"
    routers.mkdir(parents=True)
    (routers / "routers.json").write_text("{}")
    assert zoo.trained_stamp("m") != after
    assert zoo.trained_dir("kvpred", "m", "source(q4_1->int4)").name == "m-source_q4_1-_int4_"
    with pytest.raises(ValueError, match="unknown trained kind"):
        zoo.trained_dir("gates", "m", "int4")


def test_flash_and_over_the_air_copies_carry_the_routers_and_predictors(
    bundle: Path, six_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle's predictors sit under kvpred/: the flash payload lists them at their relative
    paths, the device's slot links them in, and the hub streams them over the air to an agent
    that writes them where they belong; each copy loads with its predictors."""
    import asyncio

    import flashing
    from cloud_hub.updates import _file_chunks
    from edge_agent.ota import UpdateFailed, _receive

    monkeypatch.syspath_prepend(str(Path(flashing.__file__).parent))  # the device's scripts import each other
    from device_side import link_tree  # type: ignore[import-not-found]

    from flashing.payload import build_bundle
    from models.bundle import bundle_files

    listed = bundle_files(json.loads((bundle / "manifest.json").read_text()))
    assert any(name.startswith("kvpred/d0.25/") for name in listed) and "weights.pt" in listed

    # Flash: the payload's bundle files at their paths under the bundle, linked into a slot.
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    name = str(six_path)
    served = load(six_path, quant="fp32", use_cache=False)
    predictors(served, name).save(kvpred.kv_dir(name, served.served_quant))
    built = build_bundle(name, "fp32", tmp_path / "flash-cache")
    names = {f.path.relative_to(built.dir).as_posix() for f in built.files}
    assert {n for n in names if n.startswith("kvpred/")} and "manifest.json" in names
    link_tree(built.dir, tmp_path / "slot")
    assert load_bundle(tmp_path / "slot", prepare=False).predictors is not None

    # Over the air: the hub's chunks of every listed file, then the manifest, received by the agent.
    async def chunks() -> list:
        out = []
        for rel, sha in [*listed.items(), ("manifest.json", bundle_version(bundle))]:
            out += [c async for c in _file_chunks(bundle, rel, sha)]
        return out

    sent = asyncio.run(chunks())

    async def stream(items: list):
        for c in items:
            yield c

    asyncio.run(_receive(stream(sent), tmp_path / "fetched"))
    assert load_bundle(tmp_path / "fetched", prepare=False).predictors is not None
    for bad in ("../escape.pt", "/etc/passwd", "a/b/c/d.pt", ".hidden/x"):
        evil = [type(sent[0])(path=bad, size=1, sha256="0" * 64, offset=0, data=b"x")]
        with pytest.raises(UpdateFailed, match="not a plain relative path"):
            asyncio.run(_receive(stream(evil), tmp_path / "evil"))
