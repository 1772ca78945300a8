"""GPU decode benchmark: the torch engine on CUDA with and without CUDA graphs, against the roofline.

For each variant (fp32 weights, and the int4 bundle that a GPU runs as dequantized dense weights)
the same prompt is prefilled and `--gen-tokens` greedy tokens decoded three ways: eager CUDA,
CUDA graphs, and the CPU engine as the reference for the tokens. Reported per variant:

- decode tokens/s eager and with graphs (median of `--repeats` runs), their ratio, and the
  first graph's capture cost;
- the roofline: bytes one decode step must read (the weights the GPU multiplies by, the head, and
  the KV slots attention reads) over the device-to-device copy bandwidth measured in the same run;
- whether the three runs produced the same tokens.

Needs a CUDA GPU (the device tool lends one to some sessions). The figures come back as JSON;
`--from-json FILE --write-docs` writes them to docs/benchmarks.md on a machine without a GPU.

    python benchmarks/gpu_decode.py --json out.json
    python benchmarks/gpu_decode.py --from-json out.json --write-docs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402
from benchmarks.edge_decode import bundle_for  # noqa: E402


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written over the median of 20 copies."""
    import torch

    src = torch.randn(1 << 28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9


def prompt_ids(model: str, n: int) -> list[int]:
    """n ids of real text: the evaluation corpus where it is installed, else this repo's docs."""
    from models.runtime import load

    try:
        from benchmarks.edge_decode import prompt_ids as eval_ids

        return eval_ids(model, n)
    except Exception:  # no python3.11-doc on this machine (the GPU machine has none)
        tok = load(model).tokenizer
        text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
        ids = tok.encode((ROOT / "README.md").read_text() + text)
        if len(ids) < n:
            raise RuntimeError(f"only {len(ids)} tokens of text for a {n}-token prompt") from None
        return ids[:n]


def bytes_per_token(engine, context: int) -> dict:
    """What one decode step reads: the weights its matmuls use (on a GPU, the fp32 dense copies
    of quantized layers), the head, and the KV slots attention reads at `context` positions."""
    from models.quant import QuantEmbedding, QuantLinear

    m = engine.loaded.model
    weights = sum(p.numel() * p.element_size() for p in m.layers.parameters())  # fp32 layers, norms
    weights += sum(q.shape[0] * q.shape[1] * 4 for q in m.layers.modules() if isinstance(q, QuantLinear))
    head = m.tok_embeddings if m.cfg.tied_embeddings else m.output
    head = head.linear if isinstance(head, QuantEmbedding) else head
    weights += head.shape[0] * head.shape[1] * 4 if isinstance(head, QuantLinear) else head.weight.numel() * 4
    caches = [c for c in m.caches if c is not None]
    per_slot = 2 * caches[0].k.shape[1] * caches[0].k.shape[3] * caches[0].k.element_size() * len(caches)
    return {"weights": weights, "kv_per_slot": per_slot, "kv_slots_eager": context, "kv_slots_graph": caches[0].max_len}


def decode_run(engine, ids: list[int], gen: int) -> tuple[float, float, list[int]]:
    """(prefill s, decode tokens/s, generated ids) of one greedy generation, timed on the host
    with the device synchronised (each token's argmax is read back, as a server would)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    token = int(engine.prefill("bench", ids, len(ids) + gen + 1).argmax())
    t1 = time.perf_counter()
    out = [token]
    for _ in range(gen):
        token = int(engine.decode("bench", token).argmax())
        out.append(token)
    t2 = time.perf_counter()
    engine.release("bench")
    return t1 - t0, gen / (t2 - t1), out


def measure(model: str, bits: int | None, ids: list[int], gen: int, repeats: int, bandwidth: float) -> dict:
    import torch

    from edge_agent.engines.torch_engine import TorchEngine

    source = str(bundle_for(model, bits)) if bits else model
    runs: dict = {}
    tokens: dict = {}
    for name, engine in (("eager", TorchEngine("cuda", cuda_graphs=False)), ("graphs", TorchEngine("cuda"))):
        engine.load(source)
        t0 = time.perf_counter()
        first = decode_run(engine, ids, gen)  # warm-up; for graphs, the capture happens here
        first_s = time.perf_counter() - t0
        timed = [decode_run(engine, ids, gen) for _ in range(repeats)]  # graphs: reused, not recaptured
        runs[name] = {
            "prefill_s": statistics.median(t[0] for t in timed),
            "decode_tok_s": statistics.median(t[1] for t in timed),
            "run_s": statistics.median(t[0] + gen / t[1] for t in timed),
            "first_run_s": first_s,
        }
        tokens[name] = first[2]
        assert all(t[2] == first[2] for t in timed), f"{name}: repeated runs generated different tokens"
        if name == "graphs":
            sizes = bytes_per_token(engine, len(ids) + gen // 2)
        del engine
        torch.cuda.empty_cache()
    cpu = TorchEngine("cpu")
    cpu.load(source)
    tokens["cpu"] = decode_run_cpu(cpu, ids, gen)
    graph_bytes = sizes["weights"] + sizes["kv_per_slot"] * sizes["kv_slots_graph"]
    eager_bytes = sizes["weights"] + sizes["kv_per_slot"] * sizes["kv_slots_eager"]
    roofline = bandwidth * 1e9 / graph_bytes
    g, e = runs["graphs"], runs["eager"]
    return {
        "variant": f"int{bits}" if bits else "fp32",
        "eager_tok_s": e["decode_tok_s"],
        "graphs_tok_s": g["decode_tok_s"],
        "speedup": g["decode_tok_s"] / e["decode_tok_s"],
        "capture_s": g["first_run_s"] - g["run_s"],  # the first run's extra time: warm-up and capture
        "first_run_s": {"eager": e["first_run_s"], "graphs": g["first_run_s"]},
        "prefill_s": {"eager": e["prefill_s"], "graphs": g["prefill_s"]},
        "bytes_per_token_graphs": graph_bytes,
        "bytes_per_token_eager": eager_bytes,
        "roofline_tok_s": roofline,
        "graphs_of_roofline": g["decode_tok_s"] / roofline,
        "eager_of_roofline": e["decode_tok_s"] * eager_bytes / (bandwidth * 1e9),
        "same_tokens_graphs_eager": tokens["graphs"] == tokens["eager"],
        "agreement_with_cpu": sum(a == b for a, b in zip(tokens["graphs"], tokens["cpu"], strict=True))
        / len(tokens["cpu"]),
    }


def decode_run_cpu(engine, ids: list[int], gen: int) -> list[int]:
    token = int(engine.prefill("bench", ids, len(ids) + gen + 1).argmax())
    out = [token]
    for _ in range(gen):
        token = int(engine.decode("bench", token).argmax())
        out.append(token)
    return out


def table(summary: dict) -> str:
    lines = [
        "| variant | eager tok/s | CUDA graphs tok/s | graphs / eager | graph capture | bytes a token | "
        "roofline tok/s | graphs of roofline | same tokens (graphs, eager) | agreement with CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        lines.append(
            f"| {r['variant']} | {r['eager_tok_s']:.0f} | {r['graphs_tok_s']:.0f} | {r['speedup']:.2f}x | "
            f"{r['capture_s'] * 1e3:.0f} ms | {r['bytes_per_token_graphs'] / 1e6:.0f} MB | "
            f"{r['roofline_tok_s']:.0f} | {r['graphs_of_roofline']:.1%} | {r['same_tokens_graphs_eager']} | "
            f"{r['agreement_with_cpu']:.3f} |"
        )
    return "\n".join(lines)


def write_docs(summary: dict, command: str) -> None:
    s = summary
    body = f"""## GPU decode: the torch engine on CUDA, with and without CUDA graphs

Command (on the GPU machine): `{s["command"]}`; written here by `{command}`.
{s["device"]}, torch {s["torch"]}; {s["model"]}, {s["prompt_tokens"]}-token prompt, {s["gen_tokens"]} greedy
tokens, median of {s["repeats"]} runs; device-to-device copy bandwidth {s["bandwidth_gbs"]:.0f} GB/s
(bytes read plus written), measured in the same run.

{table(s)}

- The roofline is the bytes one graph step reads (the dense fp32 weights the matmuls use, the
  head, and all of the cache's KV slots, which the fixed-shape step reads under its mask) over
  the copy bandwidth. An int4 bundle runs as dequantized dense weights on a GPU
  (`QuantLinear.dense`): the same bytes as fp32, so the same speed; a fused int4 GPU kernel
  would read 5 bits a weight instead of 32.
- Graph capture is the first generation's extra time over eager's, paid once per cache: a
  released request hands its caches and graph to the next one of the same rounded length.
- "same tokens" compares the greedy ids of the graph and eager runs; agreement with CPU is the
  fraction of positions where the CUDA graph run chose the CPU engine's token.
"""
    write_block("gpu-decode", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--variants", default="fp32,int4", help="comma-separated: fp32, int8, int4")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the summary here")
    p.add_argument("--from-json", type=Path, help="read a summary instead of measuring (no GPU needed)")
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    if args.from_json:
        summary = json.loads(args.from_json.read_text())
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_decode needs a CUDA GPU (torch sees none); see --from-json")
        bits = {"fp32": None, "int8": 8, "int4": 4}
        ids = prompt_ids(args.model, args.prompt_tokens)
        bandwidth = copy_bandwidth_gbs()
        results = [
            measure(args.model, bits[v], ids, args.gen_tokens, args.repeats, bandwidth)
            for v in args.variants.split(",")
        ]
        summary = {
            "command": command_line(),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "model": args.model,
            "prompt_tokens": len(ids),
            "gen_tokens": args.gen_tokens,
            "repeats": args.repeats,
            "bandwidth_gbs": bandwidth,
            "results": results,
        }
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
    print(table(summary))
    print(json.dumps(summary))
    if args.write_docs:
        write_docs(summary, command_line())


if __name__ == "__main__":
    main()
