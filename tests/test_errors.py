"""Bad input gets a clear, typed error: files, architectures, names, prompts, sampling."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from models.errors import (
    ContextLengthExceeded,
    GGUFError,
    InvalidRequest,
    ModelNotPulled,
    UnknownModel,
    UnsupportedArchitecture,
)
from models.loaded import LoadedModel
from models.runtime import load
from models.sampling import SamplingParams
from tandem_cli.main import main as cli


def test_truncated_gguf(tiny_path: Path, tmp_path: Path) -> None:
    data = tiny_path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=r"truncated|corrupt"):
            load(bad, use_cache=False)


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load(bad, use_cache=False)


def test_corrupt_header(tiny_path: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_path.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    bad = tmp_path / "hdr.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError):
        load(bad, use_cache=False)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitecture, match="'mamba' is not supported; supported: gemma3, llama"):
        load(path, use_cache=False)


def test_unknown_model_name() -> None:
    with pytest.raises(UnknownModel, match=r"unknown model 'gpt-17'.*smollm2-135m-instruct"):
        load("gpt-17")
    with pytest.raises(UnknownModel, match="no such model file"):
        load("/nonexistent/model.gguf")


def test_zoo_model_not_pulled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelNotPulled, match="tandem models pull gemma3-270m"):
        load("gemma3-270m")


def test_prompt_longer_than_context(tiny: LoadedModel) -> None:
    too_long = [5] * tiny.config.context_length
    with pytest.raises(ContextLengthExceeded, match=f"{tiny.config.context_length} tokens"):
        tiny.generator().generate([too_long], SamplingParams())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": "x"}, "seed"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts(tiny: LoadedModel) -> None:
    gen = tiny.generator()
    with pytest.raises(InvalidRequest, match="empty"):
        gen.generate([""], SamplingParams())
    with pytest.raises(InvalidRequest, match="token ids"):
        gen.generate([[tiny.config.vocab_size + 1]], SamplingParams())
    with pytest.raises(InvalidRequest, match="no prompts"):
        gen.generate([], SamplingParams())


def test_bad_chat_messages(tiny: LoadedModel) -> None:
    gen = tiny.generator()
    if tiny.tokenizer.info.chat_template is None:
        with pytest.raises(InvalidRequest, match="no chat template"):
            gen.encode_prompt([{"role": "user", "content": "hi"}])
        return
    with pytest.raises(InvalidRequest, match="role"):
        gen.encode_prompt([{"role": "wizard", "content": "hi"}])
    with pytest.raises(InvalidRequest, match="content"):
        gen.encode_prompt([{"role": "user", "content": 3}])


def test_cli_reports_errors_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["generate", "--model", "no-such-model", "hello"]) == 2
    assert "error: unknown model 'no-such-model'" in capsys.readouterr().err
    assert cli(["generate", "--model", "no-such-model", "--max-tokens", "0", "hello"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_failed_load_leaves_no_prepared_entry(tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_path.read_bytes()[:-50])
    with pytest.raises(GGUFError):
        load(bad)
    prepared = tmp_path / "cache" / "prepared"
    assert not prepared.exists() or not any(prepared.iterdir())
    shutil.copy(tiny_path, bad)  # the fixed file loads and is cached
    load(bad)
    assert len(list(prepared.iterdir())) == 1
