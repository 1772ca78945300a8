"""The `tandem` command: model zoo and local generation.

Thin wrappers over importable code: each sub-command parses arguments, calls the library and
prints. Errors of the Tandem family print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from models.errors import TandemModelError


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def cmd_models_list(args: argparse.Namespace) -> int:
    from models import zoo

    root = Path(args.cache_dir) if args.cache_dir else None
    print(f"{'NAME':<24} {'PULLED':<7} DESCRIPTION")
    for src, pulled in zoo.list_models(root):
        print(f"{src.name:<24} {'yes' if pulled else 'no':<7} {src.description}")
    print(f"cache: {(root or zoo.cache_dir()) / 'models'}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from models import zoo

    root = Path(args.cache_dir) if args.cache_dir else None
    for name in args.names:
        print(f"pulling {name} …", file=sys.stderr)
        path = zoo.pull(name, root, progress=_progress_bar(f"verify {name}"), force=args.force)
        print(f"{name}: {path} (sha256 verified)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from models.runtime import load
    from models.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    if not args.prompt:
        raise SystemExit("error: a prompt is required")
    loaded = load(args.model)
    gen = loaded.generator()
    chat = loaded.tokenizer.info.chat_template is not None and not args.raw
    prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt
    finish = None
    for ev in gen.stream([prompt], params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        finish = ev.finish_reason or finish
    sys.stdout.write("\n")
    print(f"[finish: {finish}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem edge-cloud inference")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the model zoo").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="list zoo models and whether they are pulled")
    p.add_argument("--cache-dir", help="cache directory (default: $TANDEM_CACHE_DIR or XDG cache)")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("pull", help="fetch and verify zoo models")
    p.add_argument("names", nargs="+")
    p.add_argument("--cache-dir")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(func=cmd_models_pull)

    p = sub.add_parser("generate", help="generate text locally, streaming")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or path to a .gguf")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TandemModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
