"""Edge decode benchmark: our engines against llama.cpp (and ONNX Runtime GenAI) in one run.

Every runtime runs in its own subprocess (so peak RSS is its own) on the same token ids (real
evaluation text), the same thread count and a short warm-up first. Each reports:

- load time, prefill time of the prompt (time to the first generated token), decode tokens/s over
  the next `--gen-tokens` greedy tokens, peak RSS;
- fidelity: teacher-forced top-1 agreement with the dequantized fp32 model (our torch reference,
  computed once in the parent) on held-out windows, each position predicted by the runtime's own
  decode path (ours: one token at a time, through the kernels; llama.cpp: its batch evaluation).

The first runtime is "ours" for the ratios (speed over speed, >1 means we are faster). The roofline
beside decode is the weight bytes read per token over the memory bandwidth measured in the same
run (a sum over a 512 MB buffer with the same threads).

    python benchmarks/edge_decode.py                        # best engine (torch int4) and the references
    python benchmarks/edge_decode.py --engine onnxruntime   # that engine first
    python benchmarks/edge_decode.py --json --write-docs    # one JSON line; rewrite docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402

OURS = {  # runtime name -> (engine, quantization)
    "torch-int4": ("torch", 4),
    "torch-int8": ("torch", 8),
    "torch-fp32": ("torch", None),
    "onnxruntime-int4": ("onnxruntime", 4),
    "onnxruntime-fp32": ("onnxruntime", None),
}
REFERENCES = ("llamacpp", "ortgenai-int4")
DEFAULT = "torch-int4,onnxruntime-int4,torch-fp32,llamacpp,ortgenai-int4"


def prompt_ids(model: str, n: int, skip: int = 0) -> list[int]:
    """n token ids of evaluation text, starting `skip` tokens in."""
    from models.corpus import documents
    from models.runtime import load

    tok = load(model).tokenizer
    ids: list[int] = []
    for doc in documents("eval"):
        ids += tok.encode(doc.text, add_bos=not ids)
        if len(ids) >= skip + n:
            return ids[skip : skip + n]
    raise RuntimeError("evaluation corpus too small")


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage: ru_maxrss survives exec, so a worker would
    report its parent's peak when that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bundle_for(model: str, bits: int) -> Path:
    """The quantized bundle of `model` (built once into the cache): what an agent would load."""
    from models import zoo

    path = zoo.cache_dir() / "bench" / f"{model}-int{bits}"
    if not (path / "manifest.json").is_file():
        from models.bundle import save_bundle
        from models.quant import quantize_model
        from models.runtime import load

        loaded = load(model)
        quantize_model(loaded.model, bits)
        save_bundle(loaded, path, model)
    return path


def weight_bytes_per_token(model: str, bits: int | None) -> float:
    """Bytes of weights one decode step reads: every block's weights and the output head."""
    from models.quant import weight_bytes
    from models.runtime import load

    loaded = load(bundle_for(model, bits) if bits else model)
    m = loaded.model
    head = weight_bytes(m.tok_embeddings) if m.cfg.tied_embeddings else weight_bytes(m.output)
    return weight_bytes(m.layers) + head


def memory_bandwidth_gbs(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(1 << 27)  # 512 MB of float32
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


# -- workers: each runs in its own process ---------------------------------------------------------


def _engine_run(name: str, model: str, ids: list[int], gen: int, threads: int, windows: list[list[int]]) -> dict:
    import torch

    torch.set_num_threads(threads)
    from edge_agent.engines.registry import make_engine

    engine_name, bits = OURS[name]
    t0 = time.perf_counter()
    engine = make_engine(engine_name)
    engine.load(str(bundle_for(model, bits)) if bits else model)
    load_s = time.perf_counter() - t0

    def generate(prompt: list[int], n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        tok = int(engine.prefill("bench", prompt, len(prompt) + n).argmax())
        t1 = time.perf_counter()
        for _ in range(n - 1):
            tok = int(engine.decode("bench", tok).argmax())
        engine.release("bench")
        return t1 - t0, time.perf_counter() - t1

    generate(ids[:16], 4)  # warm-up
    prefill_s, decode_s = generate(ids, gen)
    rss = peak_rss_mb()  # serving, before the fidelity pass below
    top1 = []
    for w in windows:  # teacher forced through the decode path
        row = [int(engine.prefill("tf", w[:1], len(w)).argmax())]
        row += [int(engine.decode("tf", t).argmax()) for t in w[1:]]
        engine.release("tf")
        top1.append(row)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_tok_s": (gen - 1) / decode_s, "top1": top1,
            "peak_rss_mb": rss}  # fmt: skip


def _llamacpp_run(model: str, ids: list[int], gen: int, threads: int, windows: list[list[int]]) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from models import zoo

    def open_model(n_ctx: int, logits_all: bool) -> Llama:
        return Llama(
            str(zoo.resolve(model)),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,  # every position's scores (eval fills them only then); costs speed
            verbose=False,
        )

    t0 = time.perf_counter()
    llm = open_model(len(ids) + gen + 8, logits_all=False)
    load_s = time.perf_counter() - t0

    def generate(prompt: list[int], n: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        stream = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
        next(stream)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            next(stream)
        return t1 - t0, time.perf_counter() - t1

    generate(ids[:16], 4)  # warm-up
    prefill_s, decode_s = generate(ids, gen)
    result = {"load_s": load_s, "prefill_s": prefill_s, "decode_tok_s": (gen - 1) / decode_s}
    result["peak_rss_mb"] = peak_rss_mb()  # serving, before the fidelity pass below
    top1: list[list[int]] = []
    scorer = open_model(max(len(w) for w in windows) + 8, logits_all=True) if windows else None
    for w in windows:
        scorer.reset()
        scorer.eval(w)
        top1.append(np.asarray(scorer.scores[: len(w)]).argmax(-1).tolist())
    result["top1"] = top1
    return result


def _ortgenai_run(model: str, ids: list[int], gen: int, threads: int, windows: list[list[int]]) -> dict:
    from benchmarks import ortgenai
    from models import zoo

    model_dir = ortgenai.build(zoo.resolve(model), zoo.cache_dir())
    result = ortgenai.run(model_dir, ids, gen, threads)
    result["peak_rss_mb"] = peak_rss_mb()  # serving, before the fidelity pass
    result["top1"] = ortgenai.top1(model_dir, windows, threads) if windows else []
    return result


def worker(args: argparse.Namespace) -> None:
    job = json.loads(Path(args.job_file).read_text())
    ids, windows = job["ids"], job["windows"]
    if args.worker in OURS:
        result = _engine_run(args.worker, args.model, ids, args.gen_tokens, args.threads, windows)
    elif args.worker == "llamacpp":
        result = _llamacpp_run(args.model, ids, args.gen_tokens, args.threads, windows)
    else:
        result = _ortgenai_run(args.model, ids, args.gen_tokens, args.threads, windows)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(json.dumps(result))


def unavailable(runtime: str) -> str:
    """Why a runtime cannot run here ('' when it can)."""
    if runtime == "llamacpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "llama-cpp-python not installed (make llamacpp)"
    elif runtime == "ortgenai-int4":
        try:
            from benchmarks import ortgenai
        except ImportError as exc:
            return f"benchmarks/ortgenai.py unavailable ({exc})"
        return ortgenai.available()
    elif runtime in OURS and OURS[runtime][0] == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime not installed (pip install 'tandem[onnx]')"
    elif runtime not in OURS:
        return f"unknown runtime (known: {', '.join([*OURS, *REFERENCES])})"
    return ""


def measure(runtime: str, args: argparse.Namespace, job_file: Path) -> dict:
    """One run of `runtime` in its own process; the job file says whether it scores the windows."""
    why = unavailable(runtime)
    if why:
        return {"skipped": why}
    cmd = [sys.executable, __file__, "--worker", runtime, "--job-file", str(job_file), "--model", args.model]
    cmd += ["--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"skipped": f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_top1(model: str, windows: list[list[int]]) -> list[list[int]]:
    """Top-1 of the dequantized fp32 model (our torch reference, exact fp32 weights of the GGUF)."""
    import torch

    from models.runtime import load
    from models.transformer import Step

    m = load(model).model
    m.fast_decode = False
    out = []
    with torch.inference_mode():
        for w in windows:
            m.setup_cache(1, len(w))
            out.append(m(torch.tensor([w]), Step.at(0, len(w)))[0].argmax(-1).tolist())
    return out


def combine(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per runtime: the median of each timing over the rounds, the highest peak RSS, the first
    round's top-1 rows, and every round's own numbers (for the ratios' spread)."""
    out: dict[str, dict] = {}
    for name, first in rounds[0].items():
        if "skipped" in first:
            out[name] = first
            continue
        runs = [r[name] for r in rounds if "skipped" not in r[name]]
        merged = {k: statistics.median(run[k] for run in runs) for k in ("load_s", "prefill_s", "decode_tok_s")}
        merged["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
        merged["top1"] = first["top1"]
        merged["rounds"] = [{k: run[k] for k in ("prefill_s", "decode_tok_s", "peak_rss_mb")} for run in runs]
        out[name] = merged
    return out


def summarise(results: dict[str, dict], ref: list[list[int]], args: argparse.Namespace, extra: dict) -> dict:
    """Ratios are medians over the rounds of each round's own ratio (ours and the reference ran
    seconds apart in it), with their range: the host's speed drifts between rounds."""
    for r in results.values():
        top1 = r.pop("top1", None)
        if top1 is not None:
            pairs = [(a, b) for got, want in zip(top1, ref, strict=True) for a, b in zip(got, want, strict=True)]
            r["agreement"] = sum(a == b for a, b in pairs) / len(pairs)
    ours_name = next(iter(results))
    ours = results[ours_name]
    summary: dict = {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "threads": args.threads,
        "ours": ours_name,
        **extra,
        "runtimes": results,
    }
    bw, weights = extra["memory_bandwidth_gbs"], extra["weight_bytes_per_token"]
    if "decode_tok_s" in ours:
        summary["roofline_tok_s"] = bw * 1e9 / weights
        summary["fraction_of_roofline"] = ours["decode_tok_s"] / summary["roofline_tok_s"]
    for name in REFERENCES:
        r = results.get(name, {})
        if "decode_tok_s" in ours and "decode_tok_s" in r:
            key = name.split("-")[0]
            pairs = list(zip(ours["rounds"], r["rounds"], strict=False))
            for metric, ratio in (
                ("decode", lambda a, b: a["decode_tok_s"] / b["decode_tok_s"]),
                ("prefill", lambda a, b: b["prefill_s"] / a["prefill_s"]),
                ("rss", lambda a, b: a["peak_rss_mb"] / b["peak_rss_mb"]),
            ):
                each = [ratio(a, b) for a, b in pairs]
                summary[f"{metric}_ratio_vs_{key}"] = statistics.median(each)
                summary[f"{metric}_ratio_range_vs_{key}"] = [min(each), max(each)]
            summary[f"agreement_minus_{key}"] = ours["agreement"] - r["agreement"]
    return summary


def table(summary: dict) -> str:
    rows = [
        "| runtime | load s | prefill s | decode tok/s | peak RSS MB | top-1 agreement with fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in summary["runtimes"].items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        rows.append(
            f"| {name} | {r['load_s']:.2f} | {r['prefill_s']:.3f} | {r['decode_tok_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['agreement']:.4f} |"
        )
    rows.append("")
    if "roofline_tok_s" in summary:
        rows.append(
            f"Roofline for {summary['ours']}: {summary['weight_bytes_per_token'] / 1e6:.1f} MB of weights a token "
            f"at {summary['memory_bandwidth_gbs']:.1f} GB/s = {summary['roofline_tok_s']:.0f} tok/s; measured "
            f"{summary['fraction_of_roofline']:.0%} of it."
        )
    for key in ("llamacpp", "ortgenai"):
        if f"decode_ratio_vs_{key}" in summary:
            parts = []
            for metric, label in (("decode", "decode"), ("prefill", "prefill"), ("rss", "peak RSS")):
                lo, hi = summary[f"{metric}_ratio_range_vs_{key}"]
                parts.append(f"{label} {summary[f'{metric}_ratio_vs_{key}']:.2f}x ({lo:.2f}x-{hi:.2f}x)")
            rows.append(
                f"{summary['ours']} vs {key}, median of {summary['rounds']} rounds' ratios (their range): "
                f"{', '.join(parts)}; agreement {summary[f'agreement_minus_{key}']:+.4f}."
            )
    return "\n".join(rows)


def cpu_model() -> str:
    """The CPU's name and widest vector unit (the kernels compile for it: -march=native)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    vector += " VNNI" if "avx512_vnni" in flags else ""
    return f"{name or platform.processor() or 'unknown CPU'}, {vector}"


def prefill_gemm() -> str:
    """Which GEMM our prefill ran on this machine (models.kernels picks it by the CPU)."""
    from models import kernels

    if kernels.available() and kernels.integer_prefill():
        return "an integer GEMM (the weights' codes times int16 activations, AVX-512 VNNI)"
    return "a fused dequantize + fp32 GEMM"


def write_docs(summary: dict, command: str) -> None:
    body = (
        f"## Edge decode ({summary['model']})\n\n"
        f"Command: `{command}`  \nMachine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, "
        f"{summary['threads']} threads; {time.strftime('%Y-%m-%d')}. Prompt: {summary['prompt_tokens']} tokens of "
        f"evaluation text, then {summary['gen_tokens']} greedy tokens; {summary['rounds']} interleaved rounds of "
        f"every runtime, each in its own process: the table holds medians (peak RSS: the highest). Agreement: "
        f"teacher-forced top-1 against the dequantized fp32 model over {summary['agreement_tokens']} held-out "
        f"tokens, each runtime through its own decode path. torch-int4: our kernels (int4 g32 on the GGUF's own "
        f"Q4_1 grid, int8 head, int16 activations; weights packed four rows at a time), one C call per layer in "
        f"decode; prefill in pieces of 256 tokens through {prefill_gemm()} and causal attention in C; "
        f"loaded from a bundle. llama.cpp: llama-cpp-python 0.3.36, native build, the Q4_1 GGUF.\n\n"
        f"{table(summary)}\n\n```json\n{json.dumps(summary)}\n```"
    )
    write_block("edge_decode", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--engine", choices=["torch", "onnxruntime"], help="our engine to put first (int4)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=2, help="held-out windows of 256 tokens for agreement")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of every runtime (medians; agreement once)"
    )
    known = ", ".join([*OURS, *REFERENCES])
    p.add_argument("--runtimes", default=DEFAULT, help=f"comma-separated, ours first: {known}")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--job-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    runtimes = args.runtimes.split(",")
    if args.engine:
        first = f"{args.engine}-int4"
        runtimes = [first, *(r for r in runtimes if r != first)]
    if runtimes[0] not in OURS:
        p.error(f"the first runtime must be one of ours ({', '.join(OURS)}), got {runtimes[0]!r}")
    ours_bits = OURS[runtimes[0]][1]
    windows = [prompt_ids(args.model, 256, skip=args.prompt_tokens + 256 * i) for i in range(args.windows)]
    job_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"tandem-bench-{os.getpid()}.json"
    prompt = prompt_ids(args.model, args.prompt_tokens)
    extra = {
        "memory_bandwidth_gbs": memory_bandwidth_gbs(args.threads),
        "weight_bytes_per_token": weight_bytes_per_token(args.model, ours_bits),
        "agreement_tokens": sum(len(w) for w in windows),
        "rounds": args.rounds,
    }
    ref = reference_top1(args.model, windows)
    rounds: list[dict[str, dict]] = []
    try:
        for i in range(args.rounds):  # ours, the references, ours again...: each round's ratios share a moment
            job_file.write_text(json.dumps({"ids": prompt, "windows": windows if i == 0 else []}))
            skipped = {name: r for name, r in rounds[0].items() if "skipped" in r} if rounds else {}
            rounds.append({name: skipped.get(name) or measure(name, args, job_file) for name in runtimes})
    finally:
        job_file.unlink(missing_ok=True)
    results = combine(rounds)
    summary = summarise(results, ref, args, extra)
    print(json.dumps(summary) if args.json else table(summary))
    if args.write_docs:
        write_docs(summary, command_line())


if __name__ == "__main__":
    main()
