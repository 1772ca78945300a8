"""Early layer skipping (issue 21): decode speed and quality at several skip ratios, on the fast engine.

Every figure is against the same fast engine the agents serve (the GGUF's own precision on our
kernels: `models.runtime.load(..., quant="source")`), unskipped, measured in the same run:

- speed: ms a decoded token after a 96-token prompt (64 tokens; one C call a token with the skip
  mask; head and argmax included), median of 5 repeats run round-robin over the variants;
- quality, over held-out windows of the evaluation split (96 prompt tokens at full depth, 64 true
  continuation tokens teacher-forced as decode would see them): bits per byte of the
  continuation tokens decode predicts, and top-1 agreement with the unskipped model;
- three ways to drop the same number of layers from decode: FiRST-style routers (trained here on
  calibration text for each ratio, `models.skip_train.train_set`: kept only where they beat static
  skipping on calibration windows held out of training), static skipping (the same least
  important layers for every input, by each layer's own KL when skipped alone), and a layer-pruned
  model (`models.prune`, block influence; its prompt runs the fewer layers too).

    python benchmarks/skip.py --json                 # one JSON line
    python benchmarks/skip.py --json --write-docs    # and its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import emit, model_section, write_block  # noqa: E402
from benchmarks.edge_decode import cpu_model  # noqa: E402
from models import runtime, skip, skip_train  # noqa: E402
from models.corpus import documents  # noqa: E402
from models.prune import block_influence, prune_layers  # noqa: E402
from models.transformer import Step, Transformer  # noqa: E402

TARGETS = {"speedup": 1.3, "bpb_increase": 0.05}
PROMPT, CONTINUATION, TRAIN_CONTINUATION = 96, 64, 32


@torch.inference_mode()
def decode_ms(model: Transformer, prompt: list[int], skip_set: frozenset[int], tokens: int) -> float:
    """ms a token decoding `tokens` greedy tokens after a full-depth prefill of `prompt`."""
    model.setup_cache(1, len(prompt) + tokens + 1)
    h = model.forward_layers(model.embed(torch.tensor([prompt])), Step.at(0, len(prompt)))
    tok = int(model.head(h[:, -1]).argmax(-1))
    start = time.perf_counter()
    for t in range(tokens):
        h = model.forward_layers(model.embed(torch.tensor([[tok]])), Step.at(len(prompt) + t, 1), skip=skip_set)
        tok = int(model.head(h[:, -1]).argmax(-1))
    return (time.perf_counter() - start) * 1000 / tokens


def run(args: argparse.Namespace) -> dict:
    began = time.time()
    served = runtime.load(args.model, quant="source")
    model, tok = served.model, served.tokenizer
    L = model.cfg.n_layers
    spec = skip.RouterSpec(args.model, "source", L, model.cfg.dim)
    protected = skip.default_protected(L)
    encode = tok.encode

    def to_bytes(ids: list[int]) -> bytes:
        return tok.decode(ids, skip_special_tokens=False).encode()

    cal_texts = [d.text for d in documents("calibration")]
    train_windows = skip_train.calibration_windows(encode, cal_texts, PROMPT + TRAIN_CONTINUATION, args.train_windows)
    eval_windows = skip_train.calibration_windows(
        encode, [d.text for d in documents("eval")], PROMPT + CONTINUATION, args.eval_windows
    )
    influence = block_influence(model, [w[:PROMPT] for w in train_windows[: args.order_windows]])
    t0 = time.time()
    router_set = skip_train.train_set(
        model,
        spec,
        train_windows,
        sorted(set(args.ratios) | set(args.draft_ratios)),
        skip_train.SkipTraining(epochs=args.epochs),
        order_windows=args.order_windows,
        select_windows=args.select_windows,
    )
    train_s = (time.time() - t0) / len(router_set.by_ratio)
    router_set.save(Path(args.cache) / f"{args.model}-source")
    order = next(iter(router_set.by_ratio.values())).static_order
    log(f"static order {order[:10]}...; {len(train_windows)} training, {len(eval_windows)} held-out windows")

    base_q = skip_train.quality(model, to_bytes, eval_windows, PROMPT, lambda p: frozenset())
    rows: list[dict] = []
    speeds: dict[str, list[float]] = {"base": []}
    variants: dict[str, tuple[Transformer, frozenset[int]]] = {"base": (model, frozenset())}
    for ratio in args.ratios:
        count = skip.skip_count(L, ratio, len(protected))
        routers = router_set.by_ratio[ratio]
        sets: list[frozenset[int]] = []

        def choose(
            pooled: torch.Tensor, r: float = ratio, routers: skip.Routers = routers, sets: list = sets
        ) -> frozenset[int]:
            s = routers.choose(pooled, r)
            sets.append(s)
            return s

        routed = skip_train.quality(model, to_bytes, eval_windows, PROMPT, choose)
        static_set = routers.static(ratio)
        static = skip_train.quality(model, to_bytes, eval_windows, PROMPT, lambda p, s=static_set: s)
        pruned_model = copy.deepcopy(model)
        prune_layers(pruned_model, count, influence)
        pruned = skip_train.quality(pruned_model, to_bytes, eval_windows, PROMPT, lambda p: frozenset(), base=model)
        variants[f"skip {count}"] = (model, static_set)
        variants[f"pruned {count}"] = (pruned_model, frozenset())
        speeds[f"skip {count}"], speeds[f"pruned {count}"] = [], []
        rows.append(
            {
                "ratio": ratio,
                "layers": count,
                "train_s": round(train_s, 1),
                "distinct_sets": len(set(sets)),
                "selected": routers.training.get("selected", ""),
                "held_out_kl": round(routers.training.get("held_out_kl", 0.0), 4),
                "static_kl": round(routers.training.get("static_kl", 0.0), 4),
                "routers": routed,
                "static": static,
                "pruned": pruned,
            }
        )
        log(f"ratio {ratio}: routers {routed.bpb:.4f}, static {static.bpb:.4f}, pruned {pruned.bpb:.4f} bpb")
    trained_routers = router_set.by_ratio
    lossless_prompts = [w[:PROMPT] for w in skip_train.calibration_windows(
        encode, [d.text for d in documents("eval")], PROMPT, args.lossless_prompts
    )]  # fmt: skip
    log(f"lossless mode: {len(lossless_prompts)} held-out prompts")
    spec_summary = lossless(args, model, {r: trained_routers[r] for r in args.draft_ratios}, lossless_prompts)
    prompt = eval_windows[0][:PROMPT]
    for m, s in variants.values():  # warm-up: builds each model's kernels view
        decode_ms(m, prompt, s, 4)
    for _ in range(args.repeats):
        for name, (m, s) in variants.items():
            speeds[name].append(decode_ms(m, prompt, s, args.tokens))
    ms = {name: statistics.median(v) for name, v in speeds.items()}
    out_rows = []
    for row in rows:
        n = row["layers"]
        speedup = ms["base"] / ms[f"skip {n}"]
        r, st, pr = row["routers"], row["static"], row["pruned"]
        out_rows.append(
            {
                "ratio": row["ratio"],
                "layers": n,
                "ms_token": round(ms[f"skip {n}"], 3),
                "speedup": round(speedup, 3),
                "pruned_speedup": round(ms["base"] / ms[f"pruned {n}"], 3),
                "routers_bpb": round(r.bpb, 4),
                "routers_bpb_increase": round(r.bpb / base_q.bpb - 1, 4),
                "routers_agreement": round(r.agreement, 4),
                "static_bpb": round(st.bpb, 4),
                "static_agreement": round(st.agreement, 4),
                "pruned_bpb": round(pr.bpb, 4),
                "pruned_agreement": round(pr.agreement, 4),
                "distinct_sets": row["distinct_sets"],
                "selected": row["selected"],
                "calibration_kl_routers": row["held_out_kl"],
                "calibration_kl_static": row["static_kl"],
                "train_s": row["train_s"],
            }
        )
    met = any(
        r["speedup"] >= TARGETS["speedup"] and r["routers_bpb_increase"] <= TARGETS["bpb_increase"] for r in out_rows
    )
    return {
        "benchmark": "skip",
        "model": args.model,
        "served_as": served.quant,
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "base_ms_token": round(ms["base"], 3),
        "base_bpb": round(base_q.bpb, 4),
        "eval_windows": len(eval_windows),
        "train_windows": len(train_windows),
        "rows": out_rows,
        "targets": TARGETS,
        "target_met": met,
        "routers_beat_static": all(r["routers_bpb"] < r["static_bpb"] for r in out_rows),
        "routers_beat_pruned": all(r["routers_bpb"] < r["pruned_bpb"] for r in out_rows),
        "lossless": spec_summary,
        "minutes": round((time.time() - began) / 60, 1),
    }


@torch.inference_mode()
def plain_tokens(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], float]:
    """The unmodified model's n greedy tokens and the ms from the first token to the last."""
    model.setup_cache(1, len(prompt) + n + 1)
    h = model.forward_layers(model.embed(torch.tensor([prompt])), Step.at(0, len(prompt)))
    out = [int(model.head(h[0, -1]).argmax())]
    start = time.perf_counter()
    for t in range(n - 1):
        h = model.forward_layers(model.embed(torch.tensor([[out[-1]]])), Step.at(len(prompt) + t, 1))
        out.append(int(model.head(h[0, -1]).argmax()))
    return out, (time.perf_counter() - start) * 1000


def lossless(args: argparse.Namespace, model: Transformer, routers: dict[float, skip.Routers], prompts: list) -> dict:
    """Greedy decoding of `prompts` by the unmodified model and by the lossless mode drafting with
    each ratio's routed skip set (adaptive k, and each fixed k): time from the first token to the
    last, round-robin, and whether every token is the same."""
    from models.sampling import SamplingParams
    from models.speculative import DraftLength, SelfSpeculative

    n = args.lossless_tokens
    modes: dict[str, tuple[float, int | None]] = {"base": (0.0, None)}
    for ratio in routers:
        modes[f"r{ratio:g} adaptive"] = (ratio, None)
        for k in args.fixed_k:
            modes[f"r{ratio:g} k={k}"] = (ratio, k)
    ms = {m: 0.0 for m in modes}
    same = {m: 0 for m in modes}
    drafted = {m: 0 for m in modes}
    accepted = {m: 0 for m in modes}
    ks: dict[str, list[int]] = {m: [] for m in modes}
    drafts: dict[str, DraftLength] = {}
    for prompt in prompts:
        want, base_ms = plain_tokens(model, prompt, n)
        ms["base"] += base_ms
        same["base"] += 1
        for name, (ratio, k) in modes.items():
            if name == "base":
                continue
            r = routers[ratio]
            route = functools.partial(r.choose, ratio=ratio)
            # Adaptive: one DraftLength a mode across prompts, as a served model keeps it (LoadedModel.drafts).
            draft = drafts.setdefault(name, DraftLength(fixed=k))
            spec = SelfSpeculative(model, route, SamplingParams(max_tokens=n), draft)
            it = spec.run(prompt, n)
            got = [next(it)]
            start = time.perf_counter()
            got += list(it)
            ms[name] += (time.perf_counter() - start) * 1000
            same[name] += int(got == want)
            drafted[name] += spec.stats.drafted
            accepted[name] += spec.stats.accepted
            ks[name] += spec.stats.ks
    rows = []
    for name in modes:
        if name == "base":
            continue
        rows.append(
            {
                "mode": name,
                "speedup": round(ms["base"] / ms[name], 3),
                "identical": same[name],
                "prompts": len(prompts),
                "acceptance": round(accepted[name] / drafted[name], 3) if drafted[name] else 0.0,
                "mean_k": round(statistics.mean(ks[name]), 2) if ks[name] else 0.0,
                "plain_share": round(ks[name].count(0) / len(ks[name]), 3) if ks[name] else 1.0,
            }
        )
    best = max(rows, key=lambda r: r["speedup"])
    return {
        "base_ms_token": round(ms["base"] / (len(prompts) * (n - 1)), 3),
        "tokens": n,
        "rows": rows,
        "best": best["mode"],
        "best_speedup": best["speedup"],
        "all_identical": all(r["identical"] == len(prompts) for r in rows),
        "target_met": any(r["speedup"] >= 1.25 and r["identical"] == len(prompts) for r in rows),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_docs(summary: dict, command: str) -> None:
    lines = [
        f"## Early layer skipping ({summary['model']}, issue 21)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {summary['cpu']}; {time.strftime('%Y-%m-%d %H:%M')}. Engine: the agents' fast path "
        f"({summary['served_as']}, our kernels; the skip mask goes into the one C call a token). Unskipped: "
        f"{summary['base_ms_token']} ms a token, {summary['base_bpb']} bits per byte over "
        f"{summary['eval_windows']} held-out windows (96 prompt tokens at full depth, 64 continuation tokens).",
        "Routers trained on calibration text only, one set a ratio, starting from static skipping, and kept only "
        "where they beat it on calibration windows held out of training (else the set is static skipping: "
        "`kept`); static: the same least important layers (own KL when skipped alone) for every prompt; pruned: "
        "the least influential layers removed (block influence), prompt included. Static and routed skipping of "
        "the same number of layers run at the same speed.",
        "",
        "| skip ratio | layers | ms / token | speed-up | routers BPB (+%) | agreement | static BPB | agreement "
        "| pruned BPB | agreement | pruned speed-up | distinct sets | kept (calibration KL: routers / static) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['ratio']} | {r['layers']} | {r['ms_token']} | {r['speedup']}x | {r['routers_bpb']} "
            f"(+{100 * r['routers_bpb_increase']:.1f}%) | {r['routers_agreement']} | {r['static_bpb']} | "
            f"{r['static_agreement']} | {r['pruned_bpb']} | {r['pruned_agreement']} | {r['pruned_speedup']}x | "
            f"{r['distinct_sets']} | {r['selected']} ({r['calibration_kl_routers']} / {r['calibration_kl_static']}) |"
        )
    spec = summary["lossless"]
    lines += [
        "",
        f"**Lossless mode** (self-speculative: the routed skip set drafts, the whole model verifies k+1 positions "
        f"in one pass from the first skipped layer on): greedy, {spec['rows'][0]['prompts']} held-out prompts, "
        f"{spec['tokens']} tokens each; unmodified: {spec['base_ms_token']} ms a token.",
        "",
        "| draft | speed-up | identical to the base | acceptance | mean k | rounds at k = 0 |",
        "|---|---|---|---|---|---|",
    ]
    for r in spec["rows"]:
        lines.append(
            f"| {r['mode']} | {r['speedup']}x | {r['identical']}/{r['prompts']} | {r['acceptance']} | "
            f"{r['mean_k']} | {100 * r['plain_share']:.0f}% |"
        )
    lines += [
        "",
        f"Target (>= 1.25x with identical greedy tokens): {'met' if spec['target_met'] else 'NOT met'}.",
    ]
    verdict = "met" if summary["target_met"] else "NOT met"
    lines += [
        "",
        f"Target (>= {TARGETS['speedup']}x decode at <= {100 * TARGETS['bpb_increase']:.0f}% more bits per byte): "
        f"{verdict}. Routers better than static skipping at every ratio: {summary['routers_beat_static']}; "
        f"than pruning: {summary['routers_beat_pruned']}.",
        "",
        "```json",
        json.dumps(summary),
        "```",
    ]
    write_block(model_section("skip", summary["model"]), "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--train-windows", type=int, default=96)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--order-windows", type=int, default=8)
    parser.add_argument("--select-windows", type=int, default=16, help="calibration windows held out of training")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft-ratios", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--fixed-k", type=int, nargs="*", default=[3])
    parser.add_argument("--lossless-prompts", type=int, default=100)
    parser.add_argument("--lossless-tokens", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "tandem" / "skip"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    summary = run(args)
    emit(summary, args.json, write_docs if args.write_docs else None)


if __name__ == "__main__":
    main()
