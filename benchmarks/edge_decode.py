"""Edge decode benchmark: our runtime against llama.cpp on the same GGUF, threads and prompt.

For each runtime, in its own subprocess (so peak RSS is its own): load time, prefill time of a
512-token prompt (time to the first generated token), decode tokens/s over the next tokens, and
peak RSS. Both runtimes get the same token ids (real text from the evaluation split) and a short
warm-up first. Ratios are ours over llama.cpp's, speed over speed (>1 means we are faster).

    python benchmarks/edge_decode.py                  # table on stdout
    python benchmarks/edge_decode.py --json           # one JSON line
    python benchmarks/edge_decode.py --write-docs     # also rewrite docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402


def prompt_ids(model: str, n: int) -> list[int]:
    from models.corpus import documents
    from models.runtime import load

    tok = load(model).tokenizer
    ids: list[int] = []
    for doc in documents("eval"):
        ids += tok.encode(doc.text, add_bos=not ids)
        if len(ids) >= n:
            return ids[:n]
    raise RuntimeError("evaluation corpus too small")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ours(model: str, ids: list[int], gen: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from models.runtime import load
    from models.transformer import Step

    t0 = time.perf_counter()
    m = load(model).model
    load_s = time.perf_counter() - t0

    @torch.inference_mode()
    def generate(prompt: list[int], n: int) -> tuple[float, float]:
        m.setup_cache(1, len(prompt) + n)
        t0 = time.perf_counter()
        h = m.forward_layers(m.embed(torch.tensor([prompt])), Step.at(0, len(prompt)))
        tok = m.head(h[:, -1]).argmax(-1)
        t1 = time.perf_counter()
        for i in range(n - 1):
            h = m.forward_layers(m.embed(tok[:, None]), Step.at(len(prompt) + i, 1))
            tok = m.head(h[:, -1]).argmax(-1)
        return t1 - t0, time.perf_counter() - t1

    generate(ids[:16], 4)  # warm-up
    prefill_s, decode_s = generate(ids, gen)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_tok_s": (gen - 1) / decode_s}


def run_llamacpp(model: str, ids: list[int], gen: int, threads: int) -> dict:
    from llama_cpp import Llama

    from models import zoo

    t0 = time.perf_counter()
    llm = Llama(
        str(zoo.resolve(model)),
        n_ctx=len(ids) + gen + 8,
        n_batch=len(ids),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
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
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_tok_s": (gen - 1) / decode_s}


RUNTIMES = {"ours": run_ours, "llamacpp": run_llamacpp}


def worker(args: argparse.Namespace) -> None:
    ids = json.loads(Path(args.ids_file).read_text())
    result = RUNTIMES[args.worker](args.model, ids, args.gen_tokens, args.threads)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measure(runtime: str, args: argparse.Namespace, ids_file: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        runtime,
        "--ids-file",
        str(ids_file),
        "--model",
        args.model,
        "--gen-tokens",
        str(args.gen_tokens),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{runtime} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, dict], args: argparse.Namespace) -> dict:
    summary: dict = {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "threads": args.threads,
        "runtimes": results,
    }
    if "ours" in results and "llamacpp" in results:
        ours, ref = results["ours"], results["llamacpp"]
        summary["decode_ratio_vs_llamacpp"] = ours["decode_tok_s"] / ref["decode_tok_s"]
        summary["prefill_ratio_vs_llamacpp"] = ref["prefill_s"] / ours["prefill_s"]
        summary["rss_ratio_vs_llamacpp"] = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    return summary


def table(summary: dict) -> str:
    rows = ["| runtime | load s | prefill 512 s | decode tok/s | peak RSS MB |", "|---|---|---|---|---|"]
    for name, r in summary["runtimes"].items():
        rows.append(
            f"| {name} | {r['load_s']:.2f} | {r['prefill_s']:.3f} | {r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    if "decode_ratio_vs_llamacpp" in summary:
        rows.append("")
        rows.append(
            f"Ours vs llama.cpp (speed over speed): decode {summary['decode_ratio_vs_llamacpp']:.2f}x, "
            f"prefill {summary['prefill_ratio_vs_llamacpp']:.2f}x; peak RSS {summary['rss_ratio_vs_llamacpp']:.2f}x."
        )
    return "\n".join(rows)


def write_docs(summary: dict, command: str) -> None:
    body = (
        f"## Edge decode ({summary['model']})\n\n"
        f"Command: `{command}`  \nMachine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{summary['threads']} threads; {time.strftime('%Y-%m-%d')}. Prompt: {summary['prompt_tokens']} tokens of "
        f"evaluation text; then {summary['gen_tokens']} greedy tokens. Ours: torch fp32 eager, weights dequantized "
        f"from the GGUF (load from the prepared cache). "
        f"llama.cpp: llama-cpp-python 0.3.36, native build, same GGUF.\n\n"
        f"{table(summary)}\n\n```json\n{json.dumps(summary)}\n```"
    )
    write_block("edge_decode", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtimes", default="ours,llamacpp", help="comma-separated: " + ",".join(RUNTIMES))
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--worker", choices=sorted(RUNTIMES), help=argparse.SUPPRESS)
    p.add_argument("--ids-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    ids_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"tandem-bench-{os.getpid()}.json"
    ids_file.write_text(json.dumps(prompt_ids(args.model, args.prompt_tokens)))
    try:
        results = {name: measure(name, args, ids_file) for name in args.runtimes.split(",")}
    finally:
        ids_file.unlink(missing_ok=True)
    summary = summarise(results, args)
    print(json.dumps(summary) if args.json else table(summary))
    if args.write_docs:
        write_docs(summary, command_line())


if __name__ == "__main__":
    main()
