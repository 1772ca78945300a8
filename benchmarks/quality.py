"""Quality table of model variants: BPB on held-out text and top-1 agreement with the base model.

Variants: fp32 (the GGUF dequantized), int8 (per channel), int4 (groups of 32 and 64), layers
pruned by block influence measured on calibration text (4, 8, 12), and combinations. Quantized
variants also carry the int8 embedding/head (groups of 32) that the agent serves. Each window is
scored in one teacher-forced pass, so this measures the weights; what the decode kernels' own
arithmetic costs is the agreement column of benchmarks/edge_decode.py. Evaluation and
calibration documents come from the fixed, disjoint splits of models.corpus.

    python benchmarks/quality.py [--model smollm2-135m-instruct] [--docs 8] [--write-docs]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.docs_block import command_line, write_block  # noqa: E402


def main() -> None:
    from models.corpus import documents
    from models.eval import agreement, bits_per_byte, windows
    from models.prune import block_influence, prune_layers
    from models.quant import quantize_model, weight_bytes
    from models.runtime import load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    base = load(args.model)
    evals = windows(base.tokenizer, [d.text for d in documents("eval", limit=args.docs)], args.tokens)
    calib = windows(base.tokenizer, [d.text for d in documents("calibration", limit=args.docs)], args.tokens)
    influence = block_influence(base.model, calib)

    def variant(bits: int | None, drop: int, group: int | None = None):
        m = copy.deepcopy(base.model)
        if drop:
            prune_layers(m, drop, influence)
        return quantize_model(m, bits, group) if bits else m

    rows = []
    fp32_bpb = None
    for name, bits, drop, group in [
        ("fp32", None, 0, None),
        ("int8", 8, 0, None),
        ("int4 g32", 4, 0, 32),
        ("int4 g64", 4, 0, 64),
        ("pruned 4", None, 4, None),
        ("pruned 8", None, 8, None),
        ("pruned 12", None, 12, None),
        ("int4 g32 + pruned 4", 4, 4, 32),
        ("int8 + pruned 8", 8, 8, None),
    ]:
        m = variant(bits, drop, group)
        q = bits_per_byte(m, base.tokenizer, evals)
        fp32_bpb = fp32_bpb or q.bpb
        rows.append(
            {
                "variant": name,
                "layers": m.cfg.n_layers,
                "weights_mb": weight_bytes(m) / 1e6,
                "bpb": q.bpb,
                "bpb_vs_fp32": q.bpb / fp32_bpb - 1,
                "agreement": agreement(base.model, m, evals),
            }
        )
    summary = {
        "model": args.model,
        "eval_docs": len(evals),
        "eval_tokens": sum(len(s) for s in evals),
        "calibration_docs": len(calib),
        "rows": rows,
    }
    lines = ["| variant | layers | weights MB | BPB | vs fp32 | top-1 agreement |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['variant']} | {r['layers']} | {r['weights_mb']:.0f} | {r['bpb']:.4f} | {r['bpb_vs_fp32']:+.2%} |"
        f" {r['agreement']:.3f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        body = (
            f"## Quality of variants ({args.model})\n\nCommand: `{command_line()}` ({time.strftime('%Y-%m-%d')})."
            f" {summary['eval_docs']} evaluation documents, {summary['eval_tokens']} tokens; pruning ranked on "
            f"{summary['calibration_docs']} calibration documents (disjoint).\n\n{table}\n\n"
            f"```json\n{json.dumps(summary)}\n```"
        )
        write_block("quality", body)


if __name__ == "__main__":
    main()
