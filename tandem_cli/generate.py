"""`tandem generate`: stream text from a local model, or through a hub with `--hub`.

The local path imports models.runtime inside the command: it imports torch (about 2 s on two
cores), which generating through a hub (the SDK only) must not pay for.
"""

from __future__ import annotations

import argparse
import sys

from tandem import Budget
from tandem.errors import TandemError
from tandem_cli.common import hub_client

DEFAULT_MODEL = "smollm2-135m-instruct"


def cmd_generate_remote(args: argparse.Namespace) -> int:
    budget = Budget(
        args.ttft_ms or 0.0,
        args.tpot_ms or 0.0,
        args.energy_j or 0.0,
        args.best_effort,
        args.quality_floor or 0.0,
        args.experts or 0,
    )
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    try:
        with hub_client(args) as client:
            stream = client.generate(
                prompt,
                stream=True,
                model=args.model or "",
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=tuple(args.stop or ()),
                budget=budget,
                skip_ratio=args.skip_ratio,
                lossless=args.lossless,
                kv_prediction=args.kv_prediction,
                kv_repair=args.kv_repair,
            )
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except TandemError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    r = stream.result
    p = r.placement
    where = f"{p.kind} {p.device_id or ''} {p.profile} {p.model}" if p else "?"
    print(
        f"\n[{r.finish_reason}; {where}; TTFT {r.ttft_ms:.0f} ms, TPOT {r.tpot_ms:.1f} ms, {r.energy_j:.2f} J"
        f"{skipped(list(r.skipped_layers), r.lossless, r.drafted, r.accepted) if args.skip_ratio else ''}"
        f"{predicted(r.kv_depth, r.kv_predicted, r.kv_repaired_at, bool(p and p.kv_prediction))}]",
        file=sys.stderr,
    )
    return 0


def skipped(layers: list[int], lossless: bool, drafted: int, accepted: int) -> str:
    """The skip report as the closing line shows it."""
    if lossless:
        return f"; lossless, drafts skipped layers {layers}, {accepted}/{drafted} accepted"
    return f"; skipped layers {layers}"


def predicted(depth: float, slots: int, repaired_at: int | None, by_hub: bool = False) -> str:
    """The KV-prediction report as the closing line shows it ("" when not predicted)."""
    if not depth:
        return ""
    how = " (turned on by the hub: --quality-floor)" if by_hub else ""
    repair = f", repaired after {repaired_at} tokens" if repaired_at is not None else ""
    return f"; KV predicted at depth {depth:g}{how} for {slots} prompt slots{repair}"


def cmd_generate(args: argparse.Namespace) -> int:
    if args.hub:
        return cmd_generate_remote(args)
    from models.runtime import load  # lazy: imports torch (see the module docstring)
    from models.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        skip_ratio=args.skip_ratio,
        lossless=args.lossless,
        kv_prediction=args.kv_prediction,
        kv_repair=args.kv_repair,
    )
    if not args.prompt:
        raise SystemExit("error: a prompt is required")
    name = args.model or DEFAULT_MODEL
    # Layer skipping and KV prediction run on the agents' fast path (the GGUF's own precision on our
    # kernels), with the routers or predictors trained for it (tandem models train-routers, train-kv);
    # otherwise the fp32 model, as before.
    loaded = load(name, quant="source" if args.skip_ratio or args.kv_prediction else None)
    if args.skip_ratio:
        print(loaded.attach_routers(name), file=sys.stderr)
    if args.kv_prediction:
        print(loaded.attach_predictors(name), file=sys.stderr)
    chat = loaded.tokenizer.info.chat_template is not None and not args.raw
    prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt
    finish, report, kv = None, None, None
    for ev in loaded.generator().stream([prompt], params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        finish = ev.finish_reason or finish
        report = ev.skipping or report
        kv = ev.kv or kv
    sys.stdout.write("\n")
    extra = skipped(list(report.layers), report.lossless, report.drafted, report.accepted) if report else ""
    extra += predicted(kv.depth, kv.predicted, kv.repaired_at) if kv else ""
    print(f"[finish: {finish}{extra}]", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text, locally or through a hub (--hub), streaming")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--model", help="zoo name or path to a .gguf (default: smollm2-135m-instruct; via a hub: any)")
    p.add_argument("--hub", help="host:port of a hub: run there, wherever it routes the request")
    p.add_argument("--api-key", help="with --hub (default: $TANDEM_API_KEY)")
    p.add_argument("--tls-ca", help="with --hub: the deployment's ca.pem, for a hub serving TLS")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--ttft-ms", type=float, help="budget: time to first token")
    p.add_argument("--tpot-ms", type=float, help="budget: time per output token")
    p.add_argument("--energy-j", type=float, help="budget: edge energy")
    p.add_argument("--best-effort", action="store_true", help="serve even when no placement meets the budget")
    p.add_argument(
        "--quality-floor",
        type=float,
        help="budget: lowest greedy agreement with the unmodified model (0..1) accepted for a faster variant "
        "(lets the hub turn KV prediction on)",
    )
    p.add_argument(
        "--experts",
        type=int,
        help="with --hub on a MoE² hub (--router-policy moe2): how many experts answer together, their next-token "
        "distributions mixed (default 1)",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument(
        "--skip-ratio", type=float, default=0.0, help="early layer skipping: the share of layers decode skips (<= 0.75)"
    )
    p.add_argument(
        "--lossless", action="store_true", help="with --skip-ratio: the skipping model only drafts; output unchanged"
    )
    p.add_argument(
        "--kv-prediction",
        type=float,
        default=0.0,
        metavar="DEPTH",
        help="KV prediction: an auxiliary model of this share of the layers (0.25, 0.5, 0.75) prefills the prompt",
    )
    p.add_argument(
        "--kv-repair", action="store_true", help="with --kv-prediction: recompute the true cache between decode steps"
    )
    p.set_defaults(func=cmd_generate)
