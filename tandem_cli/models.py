"""`tandem models list|pull|train-routers|train-kv`: the model zoo, the routers that let agents skip
layers and the predictors that let them prefill through part of the layers (KV prediction)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import zoo
from tandem_cli.common import progress_bar


def cmd_models_list(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir) if args.cache_dir else None
    print(f"{'NAME':<24} {'PULLED':<7} DESCRIPTION")
    for src, pulled in zoo.list_models(root):
        print(f"{src.name:<24} {'yes' if pulled else 'no':<7} {src.description}")
    print(f"cache: {(root or zoo.cache_dir()) / 'models'}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir) if args.cache_dir else None
    for name in args.names:
        print(f"pulling {name} …", file=sys.stderr)
        path = zoo.pull(name, root, progress=progress_bar(f"verify {name}"), force=args.force)
        print(f"{name}: {path} (sha256 verified)")
        if args.prepare:
            # Lazy: models.runtime imports torch (about 2 s), which `list` and a plain `pull` never need.
            from models.runtime import load

            load(name)  # dequantizes once into the prepared cache, so later loads take about a second
            print(f"{name}: prepared")
    return 0


def cmd_models_train_routers(args: argparse.Namespace) -> int:
    """Train a zoo model's layer-skipping routers (models.skip_train) on calibration text, one set a
    ratio, and save them where agents serving it at that precision find them."""
    # Lazy: torch and the corpus, which `list` and `pull` never need.
    from tqdm import tqdm

    from models import skip, skip_train
    from models.corpus import documents
    from models.runtime import load

    loaded = load(args.name, quant=args.quant)
    cfg = loaded.config
    spec = skip.RouterSpec(args.name, loaded.served_quant, cfg.n_layers, cfg.dim)
    config = skip_train.SkipTraining(seed=args.seed, epochs=args.epochs)
    texts = [d.text for d in documents("calibration")]
    windows = skip_train.calibration_windows(
        loaded.tokenizer.encode, texts, config.prompt_tokens + config.continuation_tokens, args.windows
    )
    print(f"{args.name} as {spec.quant}: {len(windows)} calibration windows, ratios {args.ratios}", file=sys.stderr)
    bars: dict[str, tqdm] = {}

    def progress(what: str, n: int, steps: int) -> None:
        bar = bars.get(what) or bars.setdefault(what, tqdm(total=steps, desc=what, file=sys.stderr))
        bar.update(n - bar.n)

    routers = skip_train.train_set(loaded.model, spec, windows, args.ratios, config, progress=progress)
    for bar in bars.values():
        bar.close()
    directory = skip.routers_dir(args.name, spec.quant)
    routers.save(directory)
    held_out = skip_train.calibration_windows(
        loaded.tokenizer.encode, [d.text for d in documents("eval")], config.prompt_tokens + 64, args.eval_windows
    )
    if held_out:

        def to_bytes(ids: list[int]) -> bytes:
            return loaded.tokenizer.decode(ids, skip_special_tokens=False).encode()

        base = skip_train.quality(loaded.model, to_bytes, held_out, config.prompt_tokens, lambda p: frozenset())
        print(f"held-out ({len(held_out)} windows): every layer {base.bpb:.4f} bits/byte")
        for ratio in args.ratios:
            q = skip_train.quality(
                loaded.model, to_bytes, held_out, config.prompt_tokens, lambda p, r=ratio: routers.choose(p, r)
            )
            print(f"  skip {ratio:g} ({q.skipped:.0f} layers): {q.bpb:.4f} bits/byte, agreement {q.agreement:.3f}")
    print(f"routers: {directory}")
    return 0


def cmd_models_train_kv(args: argparse.Namespace) -> int:
    """Train a zoo model's KV predictors (models.kvpred), one auxiliary depth each, and save them
    where agents serving it at that precision find them; print each variant as measured."""
    # Lazy: torch and the corpus, which `list` and `pull` never need.
    from models import kvpred, kvpred_train
    from models.runtime import load

    loaded = load(args.name, quant=args.quant)
    quant = loaded.served_quant
    config = kvpred_train.KVTraining(
        depths=tuple(args.depths), seed=args.seed, windows=args.windows, finetune_epochs=args.finetune_epochs
    )
    print(
        f"{args.name} as {quant}: KV predictors at depths {', '.join(f'{d:g}' for d in args.depths)}", file=sys.stderr
    )
    windows = kvpred_train.calibration(loaded.tokenizer.encode, config)
    spec = kvpred.PredictorSpec.of(loaded.model, args.name, quant)
    predictors = kvpred_train.train_set(
        loaded.model, spec, windows, config, progress=lambda what: print(what, file=sys.stderr)
    )
    directory = kvpred.kv_dir(args.name, quant)
    predictors.save(directory)
    print(f"{'DEPTH':<6} {'AGREEMENT':<10} {'BPB RATIO':<10} {'PREFILL':<8} AUX LAYERS")
    for v in predictors.variants():
        print(f"{v.depth:<6g} {v.agreement:<10.3f} {v.bpb_ratio:<10.3f} {v.prefill_share:<8.2f} {list(v.aux_layers)}")
    print(f"predictors: {directory}")
    return 0


def depths(text: str) -> list[float]:
    """--depths' value: auxiliary depths, comma-separated (e.g. 0.25,0.5,0.75)."""
    from models.sampling import KV_DEPTHS

    try:
        out = [float(d) for d in text.split(",") if d.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"depths must be numbers separated by commas, got {text!r}") from exc
    if not out or any(d not in KV_DEPTHS for d in out):
        raise argparse.ArgumentTypeError(f"depths must be among {', '.join(map(str, KV_DEPTHS))}, got {text!r}")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the model zoo").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="list zoo models and whether they are pulled")
    p.add_argument("--cache-dir", help="cache directory (default: $TANDEM_CACHE_DIR or XDG cache)")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("pull", help="fetch and verify zoo models")
    p.add_argument("names", nargs="+")
    p.add_argument("--cache-dir")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.add_argument("--prepare", action="store_true", help="also dequantize into the prepared-weights cache")
    p.set_defaults(func=cmd_models_pull)
    p = models.add_parser(
        "train-routers", help="train a model's layer-skipping routers on calibration text (requests' skip_ratio)"
    )
    p.add_argument("name", help="a zoo model, pulled")
    p.add_argument("--quant", default="source", help="the precision agents serve it at (default: source)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="skip ratios to train for")
    p.add_argument("--windows", type=int, default=96, help="calibration windows of 128 tokens")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows to report quality on (0: none)")
    p.set_defaults(func=cmd_models_train_routers)
    p = models.add_parser(
        "train-kv", help="train a model's KV predictors on calibration text (requests' kv_prediction)"
    )
    p.add_argument("name", help="a zoo model, pulled")
    p.add_argument("--quant", default="source", help="the precision agents serve it at (default: source)")
    p.add_argument("--depths", type=depths, default=[0.25, 0.5, 0.75], help="auxiliary depths, e.g. 0.25,0.5,0.75")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=48, help="calibration windows of 512 tokens the least squares fit")
    p.add_argument(
        "--finetune-epochs", type=int, default=0, help="passes of end-to-end fine-tuning after least squares"
    )
    p.set_defaults(func=cmd_models_train_kv)
