"""lm-evaluation-harness against the hub: its `local-completions` model over our OpenAI API.

Two local tasks over held-out text (models.corpus, the evaluation documents; lm-eval's own data
sets cannot be downloaded here), written as YAML task files with JSON-lines data:

- `tandem_pydoc_choice` (multiple_choice, i.e. log-likelihoods): a window of real text, and four
  continuations: the true one and three taken from elsewhere. lm-eval scores each continuation by
  /v1/completions with echo and logprobs (what it does for every log-likelihood task).
- `tandem_pydoc_complete` (generate_until): the same windows, greedy completion to the line's end,
  scored by exact match against the true continuation.

lm-eval tokenizes through the hub itself (`tokenizer_backend=remote`: /tokenizer_info, /tokenize,
/detokenize) and sends token ids. Every log-likelihood it reports is then compared with our own
teacher-forced evaluation of the same token ids (models.generate.Generator.score on the model as
the hub serves it): the issue's bar is 1e-3 nats per token.

    python benchmarks/lm_eval_hub.py [--items 40] [--model smollm2-135m-instruct] [--json] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTEXT_TOKENS, CONTINUATION_TOKENS, CHOICES = 32, 6, 4


def write_tasks(folder: Path, tokenizer, items: int, seed: int = 0) -> list[dict]:
    """The two tasks' YAML and data in `folder`; returns the items (context, choices, gold, target)."""
    from models.corpus import documents

    rng = random.Random(seed)
    docs = [d for d in documents("eval") if len(d.text) > 2000]
    rows = []
    while len(rows) < items:
        ids = tokenizer.encode(rng.choice(docs).text, add_bos=False)
        start = rng.randrange(0, len(ids) - CONTEXT_TOKENS - CONTINUATION_TOKENS)
        context = tokenizer.decode(ids[start : start + CONTEXT_TOKENS])
        true = tokenizer.decode(ids[start + CONTEXT_TOKENS : start + CONTEXT_TOKENS + CONTINUATION_TOKENS])
        if not context.strip() or not true.strip() or "\n" in true:
            continue
        rows.append({"context": context, "true": true})
    out = []
    for i, row in enumerate(rows):
        others = [r["true"] for j, r in enumerate(rows) if j != i]
        choices = [row["true"], *rng.sample(others, CHOICES - 1)]
        out.append({"context": row["context"], "choices": choices, "gold": 0, "target": row["true"]})
    data = folder / "pydoc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in out))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "choice.yaml").write_text(
        "task: tandem_pydoc_choice\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n'
    )
    (folder / "complete.yaml").write_text(
        "task: tandem_pydoc_complete\n" + common + "output_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return out


def evaluate(base_url: str, api_key: str, model: str, folder: Path, limit: int | None = None) -> dict:
    """lm_eval.simple_evaluate of both tasks through `local-completions` at base_url (the hub's HTTP
    address); returns its results with the samples logged."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["OPENAI_API_KEY"] = api_key  # what local-completions sends as its bearer token
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{base_url}/v1/completions",
            "model": model,
            "tokenizer_backend": "remote",
            "tokenized_requests": True,
            "auth_token": api_key,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["tandem_pydoc_choice", "tandem_pydoc_complete"],
        task_manager=TaskManager(include_path=str(folder)),
        limit=limit,
        log_samples=True,
    )


def evaluate_in_subprocess(base_url: str, api_key: str, model: str, folder: Path, limit: int | None = None) -> dict:
    """evaluate() in a child process (lm-eval's imports, logging and open files stay there), reduced
    to what compare() and the table read: {"results": {task: metrics}, "samples": {task: [{arguments,
    resps}]}}."""
    import subprocess

    out = folder / "lm_eval_results.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--evaluate", base_url, "--model", model,
           "--tasks", str(folder), "--out", str(out)] + (["--limit", str(limit)] if limit else [])  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "TANDEM_LM_EVAL_KEY": api_key}, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _reduced(results: dict) -> dict:
    return {
        "results": {t: {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
                    for t, m in results["results"].items()},
        "samples": {t: [{"arguments": [list(a) for a in s["arguments"]], "resps": s["resps"]} for s in samples]
                    for t, samples in results["samples"].items()},
    }  # fmt: skip


def compare(results: dict, tokenizer, generator) -> dict:
    """Each log-likelihood lm-eval reported against our teacher-forced score of the same tokens:
    the largest difference per token, in nats, over every (context, continuation) pair."""
    worst, pairs, tokens = 0.0, 0, 0
    for sample in results["samples"]["tandem_pydoc_choice"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            # lm-eval's own pairing (api/model.py _encode_pair): the context's trailing spaces move to
            # the continuation, the whole is encoded, and the context's ids are cut off its front.
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tokenizer.encode(context + continuation, add_bos=False)
            ctx = tokenizer.encode(context, add_bos=False)
            cont = whole[len(ctx) :]
            scored = generator.score(ctx + cont, 0)[len(ctx) :]
            ours = sum(s.logprob for s in scored if s is not None)
            theirs = resp[0][0]
            worst = max(worst, abs(ours - theirs) / len(cont))
            pairs, tokens = pairs + 1, tokens + len(cont)
    return {"pairs": pairs, "tokens": tokens, "max_diff_nats_per_token": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument(
        "--evaluate", metavar="URL", help="only run lm-eval against the hub at URL (key in $TANDEM_LM_EVAL_KEY)"
    )
    ap.add_argument("--tasks", type=Path, help="with --evaluate: the folder write_tasks wrote")
    ap.add_argument("--out", type=Path, help="with --evaluate: where to write the reduced results (JSON)")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    if args.evaluate:
        done = evaluate(args.evaluate, os.environ["TANDEM_LM_EVAL_KEY"], args.model, args.tasks, args.limit)
        args.out.write_text(json.dumps(_reduced(done), default=str))
        return

    import asyncio

    from benchmarks.docs_block import command_line, write_block
    from benchmarks.edge_decode import cpu_model
    from cloud_hub.server import Hub, HubConfig
    from models.runtime import load

    served = load(args.model, quant="source")
    folder = Path(tempfile.mkdtemp(prefix="tandem-lm-eval-"))
    write_tasks(folder, served.tokenizer, args.items)

    async def run() -> tuple[dict, float]:
        hub = Hub(HubConfig(data_dir=folder / "hub", listen="127.0.0.1:0", cloud_model=args.model, mqtt="none",
                            http_listen="127.0.0.1:0"))  # fmt: skip
        await hub.start()
        try:
            key = hub.registry.create_api_key("lm-eval")
            started = time.perf_counter()
            results = await asyncio.to_thread(
                evaluate_in_subprocess, f"http://{hub.http_address}", key, args.model, folder
            )
            return results, time.perf_counter() - started
        finally:
            await hub.stop(grace=0.5)

    results, seconds = asyncio.run(run())
    check = compare(results, served.tokenizer, served.generator())
    r = results["results"]
    headline = {
        "benchmark": "lm_eval_hub",
        "model": args.model,
        "items": args.items,
        "choice_acc": r["tandem_pydoc_choice"]["acc,none"],
        "complete_exact_match": r["tandem_pydoc_complete"]["exact_match,none"],
        "seconds": round(seconds, 1),
        **check,
        "within_1e-3": check["max_diff_nats_per_token"] <= 1e-3,
    }
    table = [
        "| task | metric | value |",
        "|---|---|---|",
        f"| tandem_pydoc_choice (log-likelihood, 4 choices) | acc | {headline['choice_acc']:.3f} |",
        f"| tandem_pydoc_complete (greedy, 8 tokens) | exact_match | {headline['complete_exact_match']:.3f} |",
        f"| log-likelihoods against our teacher-forced score | max difference, nats/token | "
        f"{check['max_diff_nats_per_token']:.2e} over {check['pairs']} pairs |",
    ]
    print("\n".join(table))
    if args.json:
        print(json.dumps(headline))
    if args.write_docs:
        write_block(
            "lm_eval_hub",
            "\n".join(
                [
                    "## lm-evaluation-harness through the hub (issue 23)",
                    "",
                    f"`{command_line()}` on {cpu_model()}: lm-eval {_version()} `local-completions` against a hub "
                    f"serving {args.model} (source precision) itself; tokenized by the hub "
                    "(`tokenizer_backend=remote`), "
                    f"{args.items} items of held-out Python documentation a task, {seconds:.0f} s.",
                    "",
                    *table,
                    "",
                    "```json",
                    json.dumps(headline),
                    "```",
                ]
            ),
        )


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


if __name__ == "__main__":
    main()
