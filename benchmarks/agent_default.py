"""The agent's default precision: yesterday's fp32 against today's "source", in one run.

`tandem agent run` without `--engine` used to serve `models.runtime.load(model)` (the GGUF
dequantized to fp32) through `models.serving.ServedModel`; it now serves `load(model,
quant="source")`: each tensor at the precision its GGUF stores it at, on our int4/int8 CPU kernels
(models.source_quant). In one process, with the same threads, this measures for each model:

- decode ms per token: `--gen-tokens` greedy tokens after a `--prompt-tokens` prompt of evaluation
  text (models.corpus), served as build_agent serves (ServedModel, the model's own generator),
  timed from the first token to the last; the median of `--rounds` interleaved rounds;
- top-1 agreement with the fp32 model, teacher-forced (models.eval.agreement's definition: every
  position of each window), over `--windows` held-out windows of 256 tokens that follow the prompt
  in the same text, and bits per byte (models.eval.bits_per_byte) of the same windows;
- for Gemma 3 270M also "int4" (models.quant.quantize_model, what `tandem optimize` builds) and
  llama.cpp on the same GGUF (its batch evaluation, scores for every position), when llama_cpp is
  importable.

    python benchmarks/agent_default.py                     # table
    python benchmarks/agent_default.py --json --write-docs  # one JSON line; rewrite its docs section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402
from benchmarks.edge_decode import cpu_model  # noqa: E402

SMOLLM2, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
WINDOW = 256


def text_ids(tok: object, n: int) -> list[int]:
    """The first n ids of the evaluation documents, one stream (BOS before the first only)."""
    from models.corpus import documents

    ids: list[int] = []
    for doc in documents("eval"):
        ids += tok.encode(doc.text, add_bos=not ids)
        if len(ids) >= n:
            return ids[:n]
    raise RuntimeError("evaluation corpus too small")


def decode_ms(served: object, ids: list[int], gen: int) -> float:
    """ms per token from the first generated token to the last, served as an agent serves."""
    from models.sampling import SamplingParams

    stamps = []
    for _ in served.stream(ids, SamplingParams(max_tokens=gen, ignore_eos=True), threading.Event()):
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000


def top1(model: object, windows: list[list[int]]) -> list[list[int]]:
    """Each window's next-token argmax at every position, in one teacher-forced pass."""
    import torch

    from models.transformer import Step

    out = []
    with torch.inference_mode():
        for w in windows:
            model.setup_cache(1, len(w))
            out.append(model(torch.tensor([w]), Step.at(0, len(w)))[0].argmax(-1).tolist())
    return out


def llamacpp_top1(model: str, windows: list[list[int]], threads: int) -> list[list[int]] | str:
    """llama.cpp's argmax at every position of each window, or why it cannot run here."""
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        return "llama-cpp-python not installed (make llamacpp)"
    from models import zoo

    llm = Llama(str(zoo.resolve(model)), n_ctx=WINDOW + 8, n_batch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        out.append(np.asarray(llm.scores[: len(w)]).argmax(-1).tolist())
    return out


def agreement(got: list[list[int]], ref: list[list[int]]) -> float:
    pairs = [(a, b) for g, r in zip(got, ref, strict=True) for a, b in zip(g, r, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def measure(model: str, quants: tuple[str, ...], args: argparse.Namespace) -> dict:
    """Every figure of one model: decode timings of fp32 and source, agreement and BPB of each quant."""
    from models.eval import bits_per_byte
    from models.quant import weight_bytes
    from models.runtime import load
    from models.serving import ServedModel

    served = {q: ServedModel(model, load(model, quant=q)) for q in quants}  # warmed up, as build_agent does
    fp32 = served["fp32"].loaded
    ids = text_ids(fp32.tokenizer, args.prompt_tokens + WINDOW * args.windows)
    prompt = ids[: args.prompt_tokens]
    windows = [ids[args.prompt_tokens + WINDOW * i :][:WINDOW] for i in range(args.windows)]
    timed = ("fp32", "source")
    rounds: dict[str, list[float]] = {q: [] for q in timed}
    for _ in range(args.rounds):  # interleaved: each round's pair shares the host's moment
        for q in timed:
            rounds[q].append(decode_ms(served[q], prompt, args.gen_tokens))
    ref = top1(fp32.model, windows)
    out: dict = {"prompt_tokens": len(prompt), "gen_tokens": args.gen_tokens, "agreement_tokens": WINDOW * len(windows)}
    for q, s in served.items():
        row = {"served_as": s.info["quant"], "weight_mb": weight_bytes(s.loaded.model) / 1e6}
        if q in rounds:
            row["decode_ms"] = statistics.median(rounds[q])
            row["decode_ms_best"] = min(rounds[q])  # the host is shared: the least disturbed round
            row["decode_ms_rounds"] = rounds[q]
        row["agreement"] = agreement(top1(s.loaded.model, windows), ref)
        row["bpb"] = bits_per_byte(s.loaded.model, s.loaded.tokenizer, windows).bpb
        out[q] = row
    if args.llamacpp and model == GEMMA:
        got = llamacpp_top1(model, windows, args.threads)
        out["llamacpp"] = {"skipped": got} if isinstance(got, str) else {"agreement": agreement(got, ref)}
    ratios = [a / b for a, b in zip(rounds["fp32"], rounds["source"], strict=True)]
    out["speedup"] = statistics.median(ratios)
    out["speedup_range"] = [min(ratios), max(ratios)]
    out["speedup_best"] = min(rounds["fp32"]) / min(rounds["source"])
    return out


def table(summary: dict) -> str:
    rows = [
        "| model | variant | served as | weights MB | decode ms/token: median (tok/s); best round | "
        "agreement with fp32 | bits per byte |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in (SMOLLM2, GEMMA):
        for name, r in summary.get(model, {}).items():
            if not isinstance(r, dict):
                continue
            if "skipped" in r:
                rows.append(f"| {model} | {name} | skipped: {r['skipped']} | | | | |")
                continue
            speed = ""
            if "decode_ms" in r:
                speed = f"{r['decode_ms']:.2f} ({1000 / r['decode_ms']:.0f}); best {r['decode_ms_best']:.2f}"
            served = r.get("served_as", "its GGUF, its own kernels")
            mb = f"{r['weight_mb']:.0f}" if "weight_mb" in r else ""
            bpb = f"{r['bpb']:.4f}" if "bpb" in r else ""
            rows.append(f"| {model} | {name} | {served} | {mb} | {speed} | {r['agreement']:.4f} | {bpb} |")
    rows.append("")
    for model in (SMOLLM2, GEMMA):
        if model in summary:
            r = summary[model]
            lo, hi = r["speedup_range"]
            rows.append(
                f"{model}: source decodes {r['speedup']:.1f}x faster than fp32 (median of each round's "
                f"ratio; range {lo:.1f}x-{hi:.1f}x; best round against best round {r['speedup_best']:.1f}x)."
            )
    return "\n".join(rows)


def headline(summary: dict) -> dict:
    """The figures the issue's targets name, flat."""
    out = {"threads": summary["threads"], "rounds": summary["rounds"], "load_average": summary["load_average"]}
    if SMOLLM2 in summary:
        s = summary[SMOLLM2]
        out |= {"smollm2_fp32_decode_ms": s["fp32"]["decode_ms"], "smollm2_source_decode_ms": s["source"]["decode_ms"],
                "smollm2_speedup": s["speedup"], "smollm2_speedup_best": s["speedup_best"],
                "smollm2_source_agreement": s["source"]["agreement"],
                "smollm2_agreement_tokens": s["agreement_tokens"], "smollm2_fp32_bpb": s["fp32"]["bpb"],
                "smollm2_source_bpb": s["source"]["bpb"]}  # fmt: skip
    if GEMMA in summary:
        g = summary[GEMMA]
        out |= {"gemma_source_agreement": g["source"]["agreement"], "gemma_int4_agreement": g["int4"]["agreement"],
                "gemma_llamacpp_agreement": g.get("llamacpp", {}).get("agreement"),
                "gemma_fp32_decode_ms": g["fp32"]["decode_ms"], "gemma_source_decode_ms": g["source"]["decode_ms"],
                "gemma_speedup": g["speedup"], "gemma_speedup_best": g["speedup_best"],
                "gemma_agreement_tokens": g["agreement_tokens"]}  # fmt: skip
    return out


def machine() -> str:
    """The CPU as lscpu names it, with the widest vector unit the kernels compile for."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name} (lscpu); {cpu_model().rsplit(', ', 1)[-1]}, {os.cpu_count()} cores"


def write_docs(summary: dict, command: str) -> None:
    s = summary
    body = (
        "## The agent's default precision: fp32 yesterday, the GGUF's own today\n\n"
        f"Command: `{command}`  \nMachine: {machine()}, {s['threads']} threads; {time.strftime('%Y-%m-%d')}; "
        f"1-minute load average {s['load_average'][0]:.2f} before, {s['load_average'][1]:.2f} after (a shared host). "
        f"`tandem agent run` without `--engine` served `load(model)` (fp32) through `ServedModel`; it now serves "
        f'`load(model, quant="source")` (models/source_quant.py: Q4_0/Q4_1/Q4_K to int4 g32, Q5_0/Q8_0 '
        f"exactly and Q5_1/Q5_K/Q6_K rounded to int8 g32, on our CPU kernels). Decode: {s['gen_tokens']} "
        f"greedy tokens after a {s['prompt_tokens']}-token prompt of evaluation text, first token to last, "
        f"through ServedModel as the agent serves; median of {s['rounds']} interleaved rounds. Agreement: "
        f"teacher-forced top-1 against the fp32 model at every position of {s['windows']} held-out windows of "
        f"{WINDOW} tokens that follow the prompt (one batch pass each; llama.cpp: llama-cpp-python's eval with "
        f"scores for every position, the same GGUF and windows). All in one process, one run.\n\n"
        f"{table(s)}\n\n```json\n{json.dumps(headline(s))}\n```"
    )
    write_block("agent_default", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=f"{SMOLLM2},{GEMMA}", help="comma-separated zoo names")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=4, help=f"held-out windows of {WINDOW} tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-llamacpp", dest="llamacpp", action="store_false", help="skip llama.cpp's agreement")
    p.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    summary: dict = {k: getattr(args, k) for k in ("threads", "rounds", "windows", "prompt_tokens", "gen_tokens")}
    summary["load_average"] = [os.getloadavg()[0]]  # the host is shared: its 1-minute load, before and after
    for model in args.models.split(","):
        summary[model] = measure(model, ("fp32", "source", "int4") if model == GEMMA else ("fp32", "source"), args)
    summary["load_average"].append(os.getloadavg()[0])
    print(json.dumps(headline(summary)) if args.json else table(summary))
    if args.write_docs:
        write_docs(summary, command_line())


if __name__ == "__main__":
    main()
