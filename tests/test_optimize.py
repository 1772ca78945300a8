"""models.optimize: the report's figures against the same measurements made independently on the
bundle it wrote, and the `tandem optimize` lines that scripts parse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.bundle import load_bundle, read_manifest
from models.corpus import documents
from models.errors import InvalidRequest
from models.eval import agreement, bits_per_byte, windows
from models.loaded import LoadedModel
from models.optimize import EVAL_DOCS, STAGES, WINDOW_TOKENS, optimize
from models.quant import weight_bytes
from tandem_cli.main import main as cli


def test_identity_variant_matches_its_base(tiny: LoadedModel, tmp_path: Path) -> None:
    report = optimize(tiny, tmp_path / "same", bits=None, decode_tokens=4)
    assert report.agreement == 1.0 and report.bpb_new == report.bpb_base and report.bpb_change == 0.0
    assert report.kept_layers == tuple(range(tiny.config.n_layers)) == tuple(read_manifest(report.bundle)["layers"])
    assert report.weight_bytes == weight_bytes(tiny.model)


def test_report_agrees_with_the_bundle_it_wrote(tiny: LoadedModel, tmp_path: Path) -> None:
    stages: list[str] = []
    report = optimize(
        tiny, tmp_path / "v", source="tiny", bits=8, drop_layers=1, decode_tokens=4, progress=stages.append
    )
    assert stages == list(STAGES)
    variant = load_bundle(report.bundle)
    manifest = read_manifest(report.bundle)
    assert manifest["source"] == "tiny" and tuple(manifest["layers"]) == report.kept_layers
    assert report.n_layers == variant.config.n_layers == len(report.kept_layers) == tiny.config.n_layers - 1
    assert report.size_bytes == sum(f.stat().st_size for f in report.bundle.iterdir())
    assert report.weight_bytes == weight_bytes(variant.model) < weight_bytes(tiny.model)
    # Reference: the same measurements, made here on the model read back from disk.
    evals = windows(tiny.tokenizer, [d.text for d in documents("eval", limit=EVAL_DOCS)], WINDOW_TOKENS)
    assert report.bpb_base == pytest.approx(bits_per_byte(tiny.model, tiny.tokenizer, evals).bpb, rel=1e-6)
    assert report.bpb_new == pytest.approx(bits_per_byte(variant.model, tiny.tokenizer, evals).bpb, rel=1e-6)
    assert report.agreement == pytest.approx(agreement(tiny.model, variant.model, evals))
    assert report.decode_tok_s > 0 and report.threads == torch.get_num_threads()


def test_bad_settings_raise_before_writing(tiny: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="bits"):
        optimize(tiny, tmp_path / "bad", bits=3)
    with pytest.raises(InvalidRequest, match="drop"):
        optimize(tiny, tmp_path / "bad", drop_layers=tiny.config.n_layers)
    assert not (tmp_path / "bad").exists()


def test_cli_prints_the_report(
    tiny_path: Path, tmp_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    argv = ["optimize", "--model", str(tiny_path), "--quant", "int4", "--prune-layers", "1", "--out", str(out)]
    assert cli(argv) == 0
    printed = capsys.readouterr()
    kept = re.search(r"^kept layers: \[([\d, ]+)\]$", printed.err, re.M)
    lines = printed.out.splitlines()
    bundle = re.fullmatch(
        rf"bundle: {re.escape(str(out))} \([\d.]+ MB on disk, weights [\d.]+ MB, (\d+) layers\)", lines[0]
    )
    assert kept and bundle and int(bundle[1]) == len(kept[1].split(",")) == load_bundle(out).config.n_layers
    assert re.fullmatch(r"speed: [\d.]+ decode tok/s \(this machine, \d+ threads\)", lines[1])
    quality = r"quality: [\d.]+ bits/byte vs [\d.]+ for the base \([+-][\d.]+%\), top-1 agreement [\d.]+"
    assert re.fullmatch(quality, lines[2])
