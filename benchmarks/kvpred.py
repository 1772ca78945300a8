"""KV prediction (issue 20): time to first token and quality when a layer-pruned pass predicts the cache.

Every figure is against the same engine the agents serve (`models.runtime.load(..., quant="source")`,
int4/int8 on our kernels), unmodified, measured in the same run:

- TTFT: prefill of the prompt and the head on its last token (cache setup excluded), median over
  prompts from the evaluation documents, after one warm-up of each variant; KV prediction is
  `models.kvpred.predict_prompt` (aux pass, predictors, write, the whole model on the last token);
- quality, on the 64 tokens after each prompt, teacher-forced: bits per byte of the true
  continuation and top-1 agreement with the whole model's prefill; and the auxiliary (pruned)
  model alone over the whole window, which KV prediction must beat;
- repair (`models.kvpred.Repair`): the base's greedy tokens teacher-forced one decode step at a
  time over a predicted cache that is repaired `--repair-chunk` slots a step: the steps until
  agreement with the base stays >= 0.99, and the cost of a decode step while repairing.

Predictors are loaded from where agents find them (`kvpred.kv_dir`), else trained on calibration
documents (never the evaluation ones) and saved there; `--quick` trains a tiny unsaved set (checks only).

    python benchmarks/kvpred.py --json                 # one JSON line
    python benchmarks/kvpred.py --json --write-docs    # and its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import emit, model_section, write_block  # noqa: E402
from benchmarks.edge_decode import cpu_model  # noqa: E402
from models import kvpred, kvpred_train, runtime  # noqa: E402
from models.corpus import documents  # noqa: E402
from models.skip_train import calibration_windows  # noqa: E402
from models.transformer import Step, Transformer  # noqa: E402

GOALS = {"ttft_ratio": 0.5, "bpb_increase": 0.05, "agreement": 0.99}
CONTINUATION = 64


START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - START:5.0f}s] {msg}", file=sys.stderr, flush=True)


@torch.inference_mode()
def ttft_ms(model: Transformer, ids: torch.Tensor, p: kvpred.KVPredictor | None) -> float:
    """ms to the first token's logits: whole-model prefill (p None) or KV prediction."""
    T = ids.shape[1]
    model.setup_cache(1, T + 1)
    t0 = time.perf_counter()
    if p is None:
        h = model.forward_layers(model.embed(ids), Step.at(0, T))[:, -1:]
    else:
        h, _ = kvpred.predict_prompt(model, p, ids)
    model.head(h)
    return (time.perf_counter() - t0) * 1000


@torch.inference_mode()
def aux_alone_logits(model: Transformer, window: list[int], prompt: int, p: kvpred.KVPredictor) -> torch.Tensor:
    """(C, V) logits for window[prompt:] with the whole window through the auxiliary layers only."""
    ids = torch.tensor([window])
    model.setup_cache(1, len(window))
    h = model.forward_layers(model.embed(ids), Step.at(0, len(window)), skip=p.dropped)
    return model.head(h[:, prompt - 1 : -1])[0]


def bits(logits: torch.Tensor, target: torch.Tensor) -> float:
    logp = F.log_softmax(logits.float(), -1)
    return float(-logp[torch.arange(len(target)), target].sum()) / math.log(2)


def predictors(args: argparse.Namespace, loaded: runtime.LoadedModel) -> tuple[kvpred.PredictorSet, dict]:
    """The set to measure and how it was obtained (loaded, or trained: seconds, saved or not)."""
    quant = loaded.served_quant
    spec = kvpred.PredictorSpec.of(loaded.model, args.model, quant)
    directory = kvpred.kv_dir(args.model, quant)
    found = None if args.train else kvpred.find_predictors(spec)
    if found is not None:
        return found, {"source": "loaded", "dir": str(directory), "train_s": None}
    config = kvpred_train.KVTraining(windows=8, held_out=2) if args.quick else kvpred_train.KVTraining()
    windows = kvpred_train.calibration(loaded.tokenizer.encode, config)
    log(f"training predictors ({config.windows} calibration windows{', quick' if args.quick else ''})")
    t0 = time.time()
    ps = kvpred_train.train_set(loaded.model, spec, windows, config, progress=log)
    train_s = round(time.time() - t0, 1)
    if not args.quick:
        ps.save(directory)
    source = "trained (quick, not saved)" if args.quick else "trained and saved"
    return ps, {"source": source, "dir": str(directory), "train_s": train_s, "fit_windows": config.windows}


def measure_length(
    model: Transformer,
    ps: kvpred.PredictorSet,
    windows: list[list[int]],
    T: int,
    to_bytes: Callable[[list[int]], bytes],
) -> tuple[dict, list[dict]]:
    """Base TTFT and bits per byte at prompt length T, and a row a depth."""
    variants: list[kvpred.KVPredictor | None] = [None, *(ps.for_depth(d) for d in ps.depths)]
    prompts = [torch.tensor([w[:T]]) for w in windows]
    for p in variants:  # warm-up
        ttft_ms(model, prompts[0], p)
    times: list[list[float]] = [[] for _ in variants]
    for ids in prompts:
        for i, p in enumerate(variants):
            times[i].append(ttft_ms(model, ids, p))
    ttft = [statistics.median(t) for t in times]
    n_bytes = 0
    base_bits = 0.0
    got = {d: {"bits": 0.0, "aux": 0.0, "same": 0} for d in ps.depths}
    total = 0
    for w in windows:
        target = torch.tensor(w[T:])  # from the first token the predicted cache answers
        n_bytes += len(to_bytes(w[T - 1 :])) - len(to_bytes(w[T - 1 : T]))
        base = kvpred_train.continuation_logits(model, w, T, None)
        base_bits += bits(base, target)
        total += len(target)
        for d in ps.depths:
            p = ps.for_depth(d)
            pred = kvpred_train.continuation_logits(model, w, T, p)
            got[d]["bits"] += bits(pred, target)
            got[d]["same"] += int((pred.argmax(-1) == base.argmax(-1)).sum())
            got[d]["aux"] += bits(aux_alone_logits(model, w, T, p), target)
    base_bpb = base_bits / max(n_bytes, 1)
    rows = []
    for i, d in enumerate(ps.depths, start=1):
        bpb = got[d]["bits"] / max(n_bytes, 1)
        rows.append(
            {
                "length": T,
                "depth": d,
                "aux_layers": len(ps.for_depth(d).aux_layers),
                "ttft_ms": round(ttft[i], 2),
                "ratio": round(ttft[i] / ttft[0], 3),
                "bpb": round(bpb, 4),
                "bpb_ratio": round(bpb / base_bpb, 4),
                "agreement": round(got[d]["same"] / max(total, 1), 4),
                "aux_alone_bpb": round(got[d]["aux"] / max(n_bytes, 1), 4),
            }
        )
        r = rows[-1]
        log(f"T={T} depth {d:g}: ttft x{r['ratio']}, bpb x{r['bpb_ratio']}, aux alone {r['aux_alone_bpb']} bpb")
    base_row = {"length": T, "prompts": len(windows), "ttft_ms": round(ttft[0], 2), "bpb": round(base_bpb, 4)}
    return base_row, rows


@torch.inference_mode()
def step(model: Transformer, token: int, slot: int) -> int:
    h = model.forward_layers(model.embed(torch.tensor([[token]])), Step.at(slot, 1))
    return int(model.head(h[:, -1]).argmax())


@torch.inference_mode()
def repair(model: Transformer, ps: kvpred.PredictorSet, prompts: list[list[int]], n: int, chunk: int) -> dict:
    """The base's greedy tokens teacher-forced over a predicted, repaired cache: agreement a step index."""
    refs: list[list[int]] = []
    plain: list[float] = []
    for prompt in prompts:
        T = len(prompt)
        model.setup_cache(1, T + n)
        h = model.forward_layers(model.embed(torch.tensor([prompt])), Step.at(0, T))
        ref = [int(model.head(h[:, -1]).argmax())]
        for i in range(1, n):
            t0 = time.perf_counter()
            ref.append(step(model, ref[-1], T + i - 1))
            plain.append(time.perf_counter() - t0)
        refs.append(ref)
    out: dict = {"length": len(prompts[0]), "tokens": n, "chunk": chunk, "prompts": len(prompts)}
    out["ms_per_token_plain"] = round(1000 * statistics.mean(plain), 3)
    rows = []
    for d in ps.depths:
        p = ps.for_depth(d)
        match = [0] * n
        repairing: list[float] = []
        repaired_at: list[int] = []
        for prompt, ref in zip(prompts, refs, strict=True):
            T = len(prompt)
            model.setup_cache(1, T + n)
            h, _ = kvpred.predict_prompt(model, p, torch.tensor([prompt]))
            match[0] += int(model.head(h[:, -1]).argmax()) == ref[0]
            fixer, done = kvpred.Repair(model, chunk), None
            for i in range(1, n):
                slot = T + i - 1
                t0 = time.perf_counter()
                working = fixer.upto < slot
                whole = fixer.before_step(prompt + ref[:i], slot)
                match[i] += step(model, ref[i - 1], slot) == ref[i]
                if working:
                    repairing.append(time.perf_counter() - t0)
                if whole and done is None:
                    done = i
            repaired_at.append(done if done is not None else n)
        mean = [m / len(prompts) for m in match]
        stays = next((k for k in range(n) if all(a >= GOALS["agreement"] for a in mean[k:])), None)
        rows.append(
            {
                "depth": d,
                "tokens_to_0.99": stays,
                "repaired_at": round(statistics.mean(repaired_at), 1),
                "first_agreement": round(mean[0], 3),
                "mean_agreement": round(statistics.mean(mean), 4),
                "ms_per_token_repairing": round(1000 * statistics.mean(repairing), 3) if repairing else None,
                "ms_per_token_plain": out["ms_per_token_plain"],
            }
        )
        log(f"repair depth {d:g}: agreement >= 0.99 from step {stays}, repaired at step {rows[-1]['repaired_at']}")
    out["rows"] = rows
    return out


def run(args: argparse.Namespace) -> dict:
    loaded = runtime.load(args.model, quant="source")
    model, tok = loaded.model, loaded.tokenizer
    ps, origin = predictors(args, loaded)

    def to_bytes(ids: list[int]) -> bytes:
        return tok.decode(ids, skip_special_tokens=False).encode()

    texts = [d.text for d in documents("eval")]
    bases, rows = [], []
    for T in args.lengths:
        windows = calibration_windows(tok.encode, texts, T + CONTINUATION, args.prompts)
        base, got = measure_length(model, ps, windows, T, to_bytes)
        bases.append(base)
        rows += got
    prompts = calibration_windows(tok.encode, texts, args.repair_length, args.prompts)
    fixed = repair(model, ps, prompts, args.repair_tokens, args.repair_chunk)
    goal = [r["ratio"] <= GOALS["ttft_ratio"] and r["bpb_ratio"] <= 1 + GOALS["bpb_increase"] for r in rows]
    return {
        "benchmark": "kvpred",
        "model": args.model,
        "served_as": loaded.served_quant,
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "predictors": origin,
        "base": bases,
        "rows": rows,
        "repair": fixed,
        "goals": GOALS,
        "ttft_half_at_5pct": any(goal),
        "ttft_half_at_5pct_every_length": any(
            all(g for g, r in zip(goal, rows, strict=True) if r["depth"] == d) for d in ps.depths
        ),
        "beats_aux_alone": all(r["bpb"] < r["aux_alone_bpb"] for r in rows),
        "minutes": round((time.time() - START) / 60, 1),
    }


def write_docs(s: dict, command: str) -> None:
    rep = s["repair"]
    met = "met" if s["ttft_half_at_5pct"] else "NOT met"
    lines = [
        f"## KV prediction ({s['model']}, issue 20)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {s['cpu']}; {time.strftime('%Y-%m-%d %H:%M')}. Engine: the agents' path ({s['served_as']}, "
        f"our kernels), against its own whole-model prefill in the same run. Predictors: {s['predictors']['source']}"
        + (f" in {s['predictors']['train_s']} s" if s["predictors"]["train_s"] is not None else "")
        + " (calibration documents only). Prompts: windows of the evaluation documents; TTFT is the median over "
        "prompts of prefill + the head on the last token; quality is the 64 tokens after the prompt, teacher-forced.",
        "",
        "| prompt | prompts | whole-model TTFT ms | BPB |",
        "|---|---|---|---|",
        *(f"| {b['length']} | {b['prompts']} | {b['ttft_ms']} | {b['bpb']} |" for b in s["base"]),
        "",
        "| prompt | depth | aux layers | TTFT ms | TTFT ratio | BPB (+%) | agreement | aux model alone BPB |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['length']} | {r['depth']:g} | {r['aux_layers']} | {r['ttft_ms']} | {r['ratio']}x | {r['bpb']} "
            f"({100 * (r['bpb_ratio'] - 1):+.1f}%) | {r['agreement']} | {r['aux_alone_bpb']} |"
            for r in s["rows"]
        ),
        "",
        f"**Repair** ({rep['prompts']} prompts of {rep['length']} tokens, the whole model's {rep['tokens']} greedy "
        f"tokens teacher-forced, {rep['chunk']} slots repaired a decode step); plain decode: "
        f"{rep['ms_per_token_plain']} ms a token.",
        "",
        "| depth | steps until agreement stays >= 0.99 | repaired at step | first-token agreement "
        "| ms / token repairing |",
        "|---|---|---|---|---|",
        *(
            f"| {r['depth']:g} | {'never' if r['tokens_to_0.99'] is None else r['tokens_to_0.99']} | "
            f"{r['repaired_at']} | {r['first_agreement']} | {r['ms_per_token_repairing']} |"
            for r in rep["rows"]
        ),
        "",
        f"Goal (TTFT <= {GOALS['ttft_ratio']}x the whole model's at <= {100 * GOALS['bpb_increase']:.0f}% more bits "
        f"per byte, at some depth): {met} (at every prompt length with one depth: "
        f"{'met' if s['ttft_half_at_5pct_every_length'] else 'NOT met'}). KV prediction better than the auxiliary "
        f"model alone at every depth and length: {s['beats_aux_alone']}.",
        "",
        "```json",
        json.dumps(s),
        "```",
    ]
    write_block(model_section("kvpred", s["model"]), "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repair-length", type=int, default=512)
    parser.add_argument("--repair-tokens", type=int, default=64)
    parser.add_argument("--repair-chunk", type=int, default=kvpred.REPAIR_CHUNK)
    parser.add_argument("--train", action="store_true", help="train predictors even if saved ones exist")
    parser.add_argument("--quick", action="store_true", help="train a tiny set, not saved (checks only)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    summary = run(args)
    emit(summary, args.json, write_docs if args.write_docs else None)


if __name__ == "__main__":
    main()
