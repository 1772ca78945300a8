"""lm-evaluation-harness (PyPI lm-eval) against the hub through its own `local-completions` model:
a log-likelihood task and a generation task, local YAML over held-out text (benchmarks/lm_eval_hub.py
holds the tasks and the full run). Every log-likelihood it reports must equal our own teacher-forced
score of the same tokens within 1e-3 nats per token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from models.runtime import load
from tests.hubkit import running_hub, tiny_llama

pytest.importorskip("lm_eval", reason="lm-eval is installed by `make test` (the eval extra)")


async def test_lm_eval_local_completions_matches_our_scores(tmp_path: Path) -> None:
    from benchmarks.lm_eval_hub import compare, evaluate_in_subprocess, write_tasks

    model = str(tiny_llama(tmp_path))
    served = load(model, quant="source", use_cache=False)
    items = write_tasks(tmp_path, served.tokenizer, items=4)
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("lm-eval")
        results = await asyncio.to_thread(evaluate_in_subprocess, f"http://{hub.http_address}", key, model, tmp_path)
    r = results["results"]
    assert set(r) == {"tandem_pydoc_choice", "tandem_pydoc_complete"}
    assert 0.0 <= r["tandem_pydoc_choice"]["acc,none"] <= 1.0
    assert len(results["samples"]["tandem_pydoc_complete"]) == len(items)
    check = compare(results, served.tokenizer, served.generator())
    assert check["pairs"] == 4 * len(items) and check["tokens"] > 0
    assert check["max_diff_nats_per_token"] <= 1e-3
