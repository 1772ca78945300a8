"""The main job for now (`make run`): both zoo models, loaded by our runtime, stream an answer.

The hub/agent issue replaces this with the full edge-cloud run (hub, three agents, routed requests).
"""

from __future__ import annotations

import sys
import time

from models.runtime import load
from models.sampling import SamplingParams


def run(name: str, prompt: str | list[dict[str, str]], max_tokens: int) -> None:
    t0 = time.perf_counter()
    loaded = load(name)
    load_s = time.perf_counter() - t0
    gen = loaded.generator()
    shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    print(f"\n== {name} ({loaded.config.arch}, {loaded.config.n_layers} layers), loaded in {load_s:.1f} s")
    print(f"prompt: {shown}\nanswer: ", end="")
    t0, first, n = time.perf_counter(), None, 0
    for ev in gen.stream([prompt], SamplingParams(max_tokens=max_tokens)):
        first = first or time.perf_counter()
        n += 1
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    end = time.perf_counter()
    tpot = (end - first) / max(n - 1, 1) * 1000 if first else 0.0
    print(f"\n[{n} tokens, TTFT {((first or end) - t0) * 1000:.0f} ms, TPOT {tpot:.1f} ms]")


def main() -> None:
    run("smollm2-135m-instruct", [{"role": "user", "content": "What is the capital of France?"}], 48)
    run("gemma3-270m", "The three primary colours are", 32)


if __name__ == "__main__":
    main()
