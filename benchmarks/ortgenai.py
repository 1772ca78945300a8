"""ONNX Runtime GenAI int4 reference runner for the edge decode benchmark.

A second reference beside llama.cpp: the GGUF is dequantized by transformers into an fp32 Hugging Face
checkpoint, which onnxruntime-genai's model builder turns into an int4 (MatMulNBits, block size 32) model
for the CPU execution provider. The built model directory is cached under ``<cache>/ortgenai/<key>/``.

    from benchmarks import ortgenai
    if reason := ortgenai.available():
        print("skipped:", reason)
    else:
        model_dir = ortgenai.build(gguf_path, zoo.cache_dir())
        print(ortgenai.run(model_dir, ids, gen=128, threads=2))

Nothing here imports onnxruntime_genai, torch or transformers at module import time, so the benchmark can
import this module where onnxruntime-genai is not installed and report ``available()`` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install onnxruntime-genai"

# Builder options: they are part of the cache key, so changing them builds a new model directory.
PRECISION = "int4"
EXECUTION_PROVIDER = "cpu"
BLOCK_SIZE = 32
EXTRA_OPTIONS = (f"block_size={BLOCK_SIZE}", "hf_token=false")

# Run in a fresh interpreter by build(): dequantizes the GGUF with transformers and saves an HF checkpoint.
# Kept out of the calling process so that its ~1.2 GB of fp32 weights never count in a benchmark's peak RSS.
_EXPORT_HF = """
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
# A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); its weights are plain fp32 by now.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""

_LOAD_CHECK = "import sys, onnxruntime_genai as og; og.Model(sys.argv[1])"


def available() -> str:
    """'' when onnxruntime-genai imports and has the API this module uses, else the reason (with the fix)."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return f"onnxruntime-genai is not installed ({e}); {INSTALL_HINT}"
    except Exception as e:  # a broken native library raises OSError and friends
        return f"onnxruntime-genai failed to import ({type(e).__name__}: {e}); reinstall: {INSTALL_HINT}"
    missing = [
        name
        for name, obj in (("Config.overlay", og.Config), ("Generator.append_tokens", og.Generator))
        if not hasattr(obj, name.split(".")[1])
    ]
    if missing:
        version = getattr(og, "__version__", "?")
        return f"onnxruntime-genai {version} lacks {', '.join(missing)}; {INSTALL_HINT}>=0.18"
    return ""


def _version() -> str:
    import onnxruntime_genai as og

    return str(getattr(og, "__version__", "unknown"))


def cache_key(gguf_path: Path) -> str:
    """Key of the built model: the GGUF's name, size and mtime, the builder's version and options."""
    st = gguf_path.stat()
    spec = json.dumps(
        [gguf_path.name, st.st_size, st.st_mtime_ns, _version(), PRECISION, EXECUTION_PROVIDER, EXTRA_OPTIONS]
    )
    return f"{gguf_path.stem}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def _check(cmd: list[str], what: str, env: dict[str, str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")


def build(gguf_path: Path, cache: Path) -> Path:
    """Build (once, cached under cache/'ortgenai'/<key>/, written atomically) an ORT GenAI int4 model directory.

    transformers loads the GGUF (dequantized to fp32) and saves it with its tokenizer as a Hugging Face
    checkpoint; ``python -m onnxruntime_genai.models.builder`` quantizes that to int4 MatMulNBits (block size
    32, the builder's defaults otherwise: symmetric, accuracy level 4, embeddings shared with the LM head when
    tied) for the CPU execution provider. Both steps run in child processes. The result is assembled in a
    temporary directory beside the final one and renamed into place, so a crash leaves no half-built model.
    Returns the model directory (genai_config.json, model.onnx and its data, tokenizer files). SmolLM2-135M:
    about 100 s on 2 cores, 86 MB on disk.
    """
    gguf_path = Path(gguf_path).resolve()
    if reason := available():
        raise RuntimeError(reason)
    root = Path(cache) / "ortgenai"
    final = root / cache_key(gguf_path)
    if (final / "genai_config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        hf_dir, out_dir = tmp / "hf", tmp / "model"
        _check([sys.executable, "-c", _EXPORT_HF, str(gguf_path), str(hf_dir)], "GGUF -> HF checkpoint", env)
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "--input",
            str(hf_dir),
            "--output",
            str(out_dir),
            "--precision",
            PRECISION,
            "--execution_provider",
            EXECUTION_PROVIDER,
            "--cache_dir",
            str(tmp / "builder_cache"),
            "--extra_options",
            *EXTRA_OPTIONS,
        ]
        _check(cmd, "onnxruntime-genai model builder", env)
        if not (out_dir / "genai_config.json").is_file():
            raise RuntimeError(f"model builder wrote no genai_config.json in {out_dir}")
        # Some builder option sets write models ORT cannot load; never cache one of those.
        _check([sys.executable, "-c", _LOAD_CHECK, str(out_dir)], "loading the built model", env)
        try:
            out_dir.rename(final)
        except OSError:  # another process finished the same build first: keep its copy
            if not (final / "genai_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _config_overlay(threads: int, max_length: int, min_length: int = 0) -> str:
    """genai_config overlay: explicit intra-op threads (ORT GenAI otherwise runs one), greedy search."""
    session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    search = {"do_sample": False, "num_beams": 1, "max_length": max_length, "min_length": min_length}
    return json.dumps({"model": {"decoder": {"session_options": session}}, "search": search})


def _load(model_dir: Path, threads: int, max_length: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()  # CPU
    config.overlay(_config_overlay(threads, max_length))
    return og.Model(config)


def _params(model: Any, max_length: int, min_length: int) -> Any:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    # min_length masks EOS so a timed run always generates the tokens it asked for (as ours and llama.cpp do).
    params.set_search_options(do_sample=False, max_length=max_length, min_length=min_length)
    return params


def run(model_dir: Path, ids: list[int], gen: int, threads: int) -> dict:
    """Greedy-generate ``gen`` tokens after prompt ``ids`` on ``threads`` intra-op threads.

    Returns {"load_s", "prefill_s" (prompt to first generated token), "decode_tok_s" ((gen-1) / time of the
    remaining tokens)}, after one untimed warm-up generation of 4 tokens on ids[:16]. EOS is masked until
    ``gen`` tokens are out, as the other runtimes of the benchmark ignore it.
    """
    import onnxruntime_genai as og

    if gen < 2:
        raise ValueError("gen must be at least 2 (one prefill token, one decode token)")
    t0 = time.perf_counter()
    model = _load(Path(model_dir), threads, len(ids) + gen)
    load_s = time.perf_counter() - t0

    def generate(prompt: list[int], n: int) -> tuple[float, float]:
        total = len(prompt) + n
        generator = og.Generator(model, _params(model, total, total))
        t0 = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        generator.get_next_tokens()
        t1 = time.perf_counter()
        for _ in range(n - 1):
            generator.generate_next_token()
        generator.get_next_tokens()
        t2 = time.perf_counter()
        produced = len(generator.get_sequence(0)) - len(prompt)
        if produced != n:
            raise RuntimeError(f"ORT GenAI generated {produced} tokens, asked for {n}")
        return t1 - t0, t2 - t1

    generate(ids[:16], 4)  # warm-up
    prefill_s, decode_s = generate(ids, gen)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_tok_s": (gen - 1) / decode_s}


def top1(model_dir: Path, windows: list[list[int]], threads: int) -> list[list[int]]:
    """Teacher-forced top-1: per window, the argmax next-token id at every position (i predicts token i+1).

    Each window is appended whole and the model's full [1, len, vocab] ``logits`` output read once (the
    builder keeps every position's logits unless ``prune_lm_head`` is set). Should a model return only the
    last position's logits, the window is fed one token at a time instead, reading logits after each.
    """
    import numpy as np
    import onnxruntime_genai as og

    if not windows:
        return []
    longest = max(len(w) for w in windows)
    model = _load(Path(model_dir), threads, longest)
    result: list[list[int]] = []
    for window in windows:
        generator = og.Generator(model, _params(model, len(window), 0))
        generator.append_tokens(window)
        logits = np.asarray(generator.get_output("logits"))
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[0] == len(window):
            result.append([int(t) for t in logits.argmax(-1)])
            continue
        generator = og.Generator(model, _params(model, len(window), 0))
        row: list[int] = []
        for token in window:
            generator.append_tokens([token])
            row.append(int(np.asarray(generator.get_logits()).reshape(-1).argmax()))
        result.append(row)
    return result
