"""Structured output: what grammar-constrained decoding (models/grammar.py) costs, and whether it holds.

SmolLM2 served as the agent serves it (`load(model, quant="source")`), greedy, `--requests` chat
requests, each with an OpenAI `response_format` json_schema (four schemas: a person with integer and
optional fields, nested weather with enums, a bounded array, a tool-like call with a $ref), the
questions varied over a few subjects. For every request, in the same process and interleaved:

- constrained: mask, choose, accept until the grammar is done; its output must parse (json.loads)
  and validate (jsonschema) against the request's schema: the count that did is reported;
- unconstrained: the same prompt, the same number of new tokens (end-of-sequence ignored), the
  same decode loop without the constraint.

Per-token times are decode steps (first token to last, prefill excluded), summed over all requests;
the mask's own cost is `Constraint.mask` (the library's bitmask for the state plus writing -inf into
the logits) and `Constraint.accept`, per token, mean and p99, timed in the run and again as the
per-token median of `--replays` replays of each request's tokens without the model (on a shared
host, a burst of another job's work lands in single steps; the median of replays filters it).
Compile times: the tokenizer adapter (once per tokenizer) and each schema's first compile (later
requests hit the cache).

    python benchmarks/structured_output.py --requests 8           # table
    python benchmarks/structured_output.py --json --write-docs   # one JSON line; rewrite its docs section
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.agent_default import machine  # noqa: E402
from benchmarks.docs_block import command_line, write_block  # noqa: E402

MODEL = "smollm2-135m-instruct"
SCHEMAS: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "maxLength": 40},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]},
            "temperature": {
                "type": "object",
                "properties": {"value": {"type": "integer"}, "unit": {"enum": ["C", "F"]}},
                "required": ["value", "unit"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "sky", "temperature"],
        "additionalProperties": False,
    },
    "list": {
        "type": "object",
        "properties": {
            "topic": {"type": "string", "maxLength": 20},
            "items": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4},
        },
        "required": ["topic", "items"],
        "additionalProperties": False,
    },
    "booking": {
        "type": "object",
        "properties": {
            "guest": {"$ref": "#/$defs/name"},
            "nights": {"type": "integer", "minimum": 1, "maximum": 30},
            "room": {"enum": ["single", "double", "suite"]},
            "breakfast": {"type": "boolean"},
        },
        "required": ["guest", "nights", "room", "breakfast"],
        "additionalProperties": False,
        "$defs": {"name": {"type": "string", "maxLength": 24}},
    },
}
QUESTIONS: dict[str, list[str]] = {
    "person": ["Alice, 30 years old", "Bob, a retired teacher of 71", "a baby called Zoe", "Dr. Chen, 45"],
    "weather": ["Paris in spring", "Oslo in winter", "Cairo at noon", "London today"],
    "list": ["fruits", "primary colours", "planets", "programming languages"],
    "booking": ["two nights in a double room for Ana", "a week in a suite", "one night, no breakfast"],
}
ASK = {
    "person": "Describe this person as JSON: {}.",
    "weather": "Give the weather as JSON: {}.",
    "list": "List some {} as JSON.",
    "booking": "Make a hotel booking as JSON: {}.",
}


@dataclass
class Run:
    """One decode: its tokens, the time of each step, and the constraint's costs per token (s)."""

    tokens: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    mask_s: list[float] = field(default_factory=list)
    accept_s: list[float] = field(default_factory=list)
    done: bool = False


def requests(n: int) -> list[tuple[str, str]]:
    """(schema name, question) for n requests, cycling through schemas and their subjects."""
    names = list(SCHEMAS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        subjects = QUESTIONS[name]
        out.append((name, ASK[name].format(subjects[(i // len(names)) % len(subjects)])))
    return out


def decode(lm: object, ids: list[int], max_tokens: int, constraint: object | None = None) -> Run:
    """Greedy decoding of up to max_tokens after ids; with a constraint: mask, choose, accept, stop
    when done (the hook Generator takes). Without: exactly max_tokens, end-of-sequence ignored."""
    import torch

    from models.transformer import Step

    m, run = lm.model, Run()
    eos = set(lm.tokenizer.info.eos_ids) if constraint is not None else set()
    with torch.inference_mode():
        m.setup_cache(1, len(ids) + max_tokens)
        h = m.forward_layers(m.embed(torch.tensor([ids])), Step.at(0, len(ids)))
        for t in range(max_tokens):
            logits = m.head(h[:, -1])  # (1, V)
            if constraint is not None:
                t0 = time.perf_counter()
                constraint.mask(logits)
                run.mask_s.append(time.perf_counter() - t0)
            tok = int(logits.argmax())
            if constraint is not None:
                t0 = time.perf_counter()
                constraint.accept(tok)
                run.accept_s.append(time.perf_counter() - t0)
            run.stamps.append(time.perf_counter())
            if tok in eos:
                run.done = True
                break
            run.tokens.append(tok)
            if constraint is not None and constraint.done:
                run.done = True
                break
            h = m.forward_layers(m.embed(torch.tensor([[tok]])), Step.at(len(ids) + t, 1))
    return run


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def step_seconds(run: Run) -> tuple[float, int]:
    """(seconds, steps) from the first token to the last."""
    return run.stamps[-1] - run.stamps[0], len(run.stamps) - 1


def replay(grammar: object, tokens: list[int], vocab_size: int, rounds: int) -> list[tuple[float, float]]:
    """Per token of a finished request: (mask, accept) seconds, each the median of `rounds` replays
    of its tokens through fresh constraints, without the model (a shared host's bursts filtered)."""
    import torch

    logits = torch.zeros(vocab_size)
    times: list[list[tuple[float, float]]] = []
    for _ in range(rounds):
        c, row = grammar.start(), []
        for tok in tokens:
            t0 = time.perf_counter()
            c.mask(logits)
            t1 = time.perf_counter()
            c.accept(tok)
            row.append((t1 - t0, time.perf_counter() - t1))
        times.append(row)
    return [tuple(statistics.median(r[i][k] for r in times) for k in (0, 1)) for i in range(len(tokens))]


def measure(args: argparse.Namespace) -> dict:
    import jsonschema

    from models.grammar import compile_response_format, vocabulary
    from models.runtime import load

    lm = load(MODEL, quant="source")
    tok, vocab_size = lm.tokenizer, lm.config.vocab_size
    t0 = time.perf_counter()
    vocabulary(tok, vocab_size)
    out: dict = {"adapter_ms": (time.perf_counter() - t0) * 1000, "compile_ms": {}, "requests": args.requests}
    gen = lm.generator()
    decode(lm, gen.encode_prompt([{"role": "user", "content": "Hello"}]), 8)  # warm the kernels and pages
    valid, finished, c_time, c_steps, u_time, u_steps, ratios = 0, 0, 0.0, 0, 0.0, 0, []
    masks, accepts, failures, replayed = [], [], [], []
    for name, question in requests(args.requests):
        rf = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
        t0 = time.perf_counter()
        grammar = compile_response_format(tok, vocab_size, rf)
        out["compile_ms"].setdefault(name, (time.perf_counter() - t0) * 1000)  # the first: a cache miss
        ids = gen.encode_prompt([{"role": "user", "content": question}])
        con = decode(lm, ids, args.max_tokens, grammar.start())
        free = decode(lm, ids, len(con.stamps))  # the same prompt and number of tokens, no grammar
        text = tok.decode(con.tokens)
        finished += con.done
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{name}: {type(exc).__name__}: {text[:80]!r}")
        (cs, cn), (us, un) = step_seconds(con), step_seconds(free)
        c_time, c_steps, u_time, u_steps = c_time + cs, c_steps + cn, u_time + us, u_steps + un
        if cn and un:
            ratios.append((cs / cn) / (us / un))
        masks += con.mask_s
        accepts += con.accept_s
        if args.replays:
            replayed += replay(grammar, con.tokens, vocab_size, args.replays)
    out |= {
        "valid": valid,
        "finished": finished,
        "failures": failures[:5],
        "tokens": len(masks),
        "constrained_ms_per_token": c_time / c_steps * 1000,
        "unconstrained_ms_per_token": u_time / u_steps * 1000,
        "ratio": (c_time / c_steps) / (u_time / u_steps),
        "ratio_median_request": statistics.median(ratios),
        "mask_us_mean": statistics.mean(masks) * 1e6,
        "mask_us_p99": p99(masks) * 1e6,
        "accept_us_mean": statistics.mean(accepts) * 1e6,
        "accept_us_p99": p99(accepts) * 1e6,
        "replays": args.replays,
    }
    if replayed:
        out |= {
            "replay_mask_us_mean": statistics.mean(m for m, _ in replayed) * 1e6,
            "replay_mask_us_p99": p99([m for m, _ in replayed]) * 1e6,
            "replay_accept_us_mean": statistics.mean(a for _, a in replayed) * 1e6,
        }
    return out


def through_hub(args: argparse.Namespace) -> dict:
    """The same requests through a hub serving MODEL itself (its HTTP API, the openai client),
    `--hub-concurrency` at a time: how many answers parse and validate, and their latency."""
    import asyncio

    import jsonschema
    import openai

    from cloud_hub.server import Hub, HubConfig

    async def run() -> dict:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="tandem-structured-"))
        loopback = "127.0.0.1:0"
        config = HubConfig(data_dir=folder, listen=loopback, cloud_model=MODEL, mqtt="none", http_listen=loopback)
        hub = Hub(config)
        await hub.start()
        gate = asyncio.Semaphore(args.hub_concurrency)
        valid, seconds, tpot, failures = 0, [], [], []
        async with openai.AsyncOpenAI(
            base_url=f"http://{hub.http_address}/v1", api_key=hub.registry.create_api_key("bench"), timeout=600
        ) as client:

            async def one(name: str, question: str) -> None:
                nonlocal valid
                rf = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
                async with gate:
                    t0 = time.perf_counter()
                    r = await client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": question}],
                        temperature=0,
                        max_tokens=args.max_tokens,
                        response_format=rf,
                    )
                    seconds.append(time.perf_counter() - t0)
                text = r.choices[0].message.content or ""
                tpot.append(r.model_extra["tandem"]["tpot_ms"])
                try:
                    jsonschema.validate(json.loads(text), SCHEMAS[name])
                    valid += 1
                except (ValueError, jsonschema.ValidationError) as exc:
                    failures.append(f"{name}: {type(exc).__name__}: {text[:80]!r}")

            t0 = time.perf_counter()
            await asyncio.gather(*(one(n, q) for n, q in requests(args.requests)))
            wall = time.perf_counter() - t0
        await hub.stop(grace=0.5)
        seconds.sort()
        return {
            "hub_requests": args.requests,
            "hub_valid": valid,
            "hub_concurrency": args.hub_concurrency,
            "hub_wall_s": wall,
            "hub_latency_p50_s": seconds[len(seconds) // 2],
            "hub_latency_p95_s": seconds[int(0.95 * (len(seconds) - 1))],
            "hub_tpot_ms_median": statistics.median(tpot),
            "hub_failures": failures[:5],
        }  # fmt: skip

    return asyncio.run(run())


def headline(s: dict) -> dict:
    keys = ("requests", "valid", "finished", "tokens", "constrained_ms_per_token", "unconstrained_ms_per_token",
            "ratio", "ratio_median_request", "mask_us_mean", "mask_us_p99", "accept_us_mean", "accept_us_p99",
            "adapter_ms", "threads", "load_average", "replay_mask_us_mean", "replay_mask_us_p99",
            "replay_accept_us_mean", "hub_requests", "hub_valid", "hub_concurrency", "hub_wall_s",
            "hub_latency_p50_s", "hub_latency_p95_s", "hub_tpot_ms_median")  # fmt: skip
    return {k: s[k] for k in keys if k in s} | {"compile_ms_first": s["compile_ms"]}


def table(s: dict) -> str:
    compiles = ", ".join(f"{k} {v:.1f}" for k, v in s["compile_ms"].items())
    rows = [
        "| figure | value |",
        "|---|---|",
        f"| requests whose output parsed and validated | {s['valid']} of {s['requests']} "
        f"(grammar completed: {s['finished']}) |",
        f"| decode ms per token, constrained | {s['constrained_ms_per_token']:.2f} |",
        f"| decode ms per token, unconstrained (same prompts, same token counts) | "
        f"{s['unconstrained_ms_per_token']:.2f} |",
        f"| ratio (all tokens; median of requests) | {s['ratio']:.3f}; {s['ratio_median_request']:.3f} |",
        f"| mask us per token: mean, p99 ({s['tokens']} tokens) | {s['mask_us_mean']:.0f}, {s['mask_us_p99']:.0f} |",
        f"| accept us per token: mean, p99 | {s['accept_us_mean']:.0f}, {s['accept_us_p99']:.0f} |",
        *replay_rows(s),
        f"| tokenizer adapter, once per tokenizer (ms) | {s['adapter_ms']:.0f} |",
        f"| first compile per schema (ms) | {compiles} |",
    ]
    if "hub_valid" in s:
        rows += [
            f"| through the hub, {s['hub_concurrency']} at a time: parsed and validated | "
            f"{s['hub_valid']} of {s['hub_requests']} |",
            f"| through the hub: latency p50, p95 (s); TPOT median (ms); wall (s) | {s['hub_latency_p50_s']:.2f}, "
            f"{s['hub_latency_p95_s']:.2f}; {s['hub_tpot_ms_median']:.1f}; {s['hub_wall_s']:.0f} |",
        ]
    if s["failures"] or s.get("hub_failures"):
        rows.append("\nFailures: " + "; ".join(s["failures"] + s.get("hub_failures", [])))
    return "\n".join(rows)


def replay_rows(s: dict) -> list[str]:
    if "replay_mask_us_mean" not in s:
        return []
    figures = f"{s['replay_mask_us_mean']:.0f}, {s['replay_mask_us_p99']:.0f}; {s['replay_accept_us_mean']:.0f}"
    return [f"| replayed, no model (median of {s['replays']}): mask us mean, p99; accept us mean | {figures} |"]


def write_docs(s: dict, command: str) -> None:
    body = (
        "## Structured output: the cost of a grammar\n\n"
        f"Command: `{command}`  \nMachine: {machine()}, {s['threads']} threads; {time.strftime('%Y-%m-%d')}; "
        f"1-minute load average {s['load_average'][0]:.2f} before, {s['load_average'][1]:.2f} after (a shared host). "
        f'{MODEL} served as the agent serves it (`load(model, quant="source")`), greedy; {s["requests"]} chat '
        f"requests with an OpenAI `response_format` json_schema (four schemas: integer and optional fields, "
        f"nested enums, a bounded array, a `$ref`), constrained by models/grammar.py (llguidance). Each "
        f"request also ran unconstrained, interleaved, with the same prompt and the same number of new tokens, "
        f"through the same decode loop. Decode steps only (prefill excluded), summed over the requests; the mask "
        f"is `Constraint.mask` (the state's bitmask plus -inf written into the logits), timed in the run and, "
        f"apart from the host's bursts, as the per-token median of {s['replays']} replays of each request's "
        f"tokens through fresh constraints without the model.\n\n"
        f"{table(s)}\n\n```json\n{json.dumps(headline(s))}\n```"
    )
    write_block("structured_output", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=96, help="most new tokens a constrained request may take")
    p.add_argument("--replays", type=int, default=5, help="replays of each request's tokens without the model; 0: none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hub-concurrency", type=int, default=4, help="requests at once through the hub; 0: no hub pass")
    p.add_argument("--json", action="store_true", help="print one JSON line of headline figures")
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # the host is shared: its 1-minute load, before and after
    summary = measure(args) | {"threads": args.threads}
    if args.hub_concurrency:
        summary |= through_hub(args)
    summary["load_average"] = [load_before, os.getloadavg()[0]]
    print(json.dumps(headline(summary)) if args.json else table(summary))
    if args.write_docs:
        write_docs(summary, command_line())


if __name__ == "__main__":
    main()
