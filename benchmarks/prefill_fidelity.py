"""Prefill's fidelity on each GEMM path: an int4 g32 model teacher-forced in one pass per window
(so through models.kernels.qgemm), with the integer GEMM (CPUs with AVX-512 VNNI) and with the
fp32 GEMM (TANDEM_QGEMM_FP32=1), against the dequantized fp32 model: top-1 agreement and BPB on
held-out text (models.corpus's evaluation split).

    python benchmarks/prefill_fidelity.py [--model smollm2-135m-instruct] [--docs 8] [--tokens 512]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from models import kernels
    from models.corpus import documents
    from models.eval import agreement, bits_per_byte, windows
    from models.quant import quantize_model
    from models.runtime import load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args()
    base = load(args.model)
    evals = windows(base.tokenizer, [d.text for d in documents("eval", limit=args.docs)], args.tokens)
    model = quantize_model(copy.deepcopy(base.model), 4, 32)

    def measure() -> dict[str, float]:
        bpb = bits_per_byte(model, base.tokenizer, evals).bpb
        return {"bpb": bpb, "agreement": agreement(base.model, model, evals)}

    rows = {"fp32 model": {"bpb": bits_per_byte(base.model, base.tokenizer, evals).bpb, "agreement": 1.0}}
    if kernels.integer_prefill():  # CPUs without VNNI have only the fp32 path
        rows["int4, integer GEMM"] = measure()
    os.environ["TANDEM_QGEMM_FP32"] = "1"
    rows["int4, fp32 GEMM"] = measure()
    print(json.dumps({"model": args.model, "windows": len(evals), "tokens": sum(map(len, evals)), "rows": rows}))


if __name__ == "__main__":
    main()
