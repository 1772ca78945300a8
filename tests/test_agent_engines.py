"""The agent serving through an InferenceEngine (`tandem agent run --engine torch --device ...`):
the same events as the model's own generator, request by request."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from edge_agent.engines.registry import ENGINES
from edge_agent.engines.torch_engine import TorchEngine
from edge_agent.runner import build_agent
from models.generate import Continuation, TokenEvent
from models.loaded import LoadedModel
from models.runtime import load
from models.sampling import SamplingParams
from models.serving import ServedModel
from tandem_cli.main import build_parser


def _events(engine: ServedModel, ids: list[int], params: SamplingParams, cont: Continuation | None = None):
    return list(engine.stream(ids, params, threading.Event(), cont))


def _pair(tiny_path: Path, device: str = "cpu") -> tuple[ServedModel, ServedModel]:
    backend = TorchEngine(device)
    backend.load(str(tiny_path))
    return ServedModel("tiny", load(tiny_path, use_cache=False)), ServedModel("tiny", backend.loaded, backend)


def test_an_engine_backed_agent_yields_what_the_generator_yields(tiny: LoadedModel, tiny_path: Path) -> None:
    plain, backed = _pair(tiny_path)
    prompt = plain.encode("the cat sat on")
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    want = _events(plain, prompt, greedy)
    assert _events(backed, prompt, greedy) == want
    assert len(want) == 12 and want[-1].finish_reason == "length"
    # a stop string taken from the greedy text ends both at the same token
    text = "".join(e.text for e in want)
    stop = SamplingParams(max_tokens=12, ignore_eos=True, stop=(text[len(text) // 2 : len(text) // 2 + 2],))
    stopped = _events(backed, prompt, stop)
    assert stopped == _events(plain, prompt, stop) and stopped[-1].finish_reason == "stop"
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
    assert _events(backed, prompt, sampled) == _events(plain, prompt, sampled)
    # going on from tokens produced elsewhere (failover) gives the rest of the same answer
    head = want[:4]
    cont = Continuation(tuple(e.token_id for e in head), len("".join(e.text for e in head)))
    rest = _events(backed, prompt, SamplingParams(max_tokens=8, ignore_eos=True), cont)
    assert [e.token_id for e in rest] == [e.token_id for e in want[4:]]
    assert "".join(e.text for e in rest) == "".join(e.text for e in want[4:])
    assert backed.engine._requests == {}  # every request released


def test_engine_and_device_settings_are_checked(tiny_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs an engine"):
        build_agent("127.0.0.1:1", "cpu-2core", str(tiny_path), tmp_path, device="cuda")
    base = ["agent", "run", "--hub", "h:1", "--profile", "p"]
    assert (build_parser().parse_args(base).engine, build_parser().parse_args(base).device) == (None, "cpu")
    for name in ENGINES:  # every registered engine can be asked for, nothing else
        assert build_parser().parse_args([*base, "--engine", name, "--device", "cuda"]).engine == name
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--engine", "nosuch"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device tool lends one to some tasks)")
def test_an_agent_on_cuda_yields_what_the_cpu_generator_yields(tiny: LoadedModel, tiny_path: Path) -> None:
    plain, backed = _pair(tiny_path, "cuda")
    prompt = plain.encode("the cat sat on")
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    got: list[TokenEvent] = _events(backed, prompt, greedy)
    assert got == _events(plain, prompt, greedy)
    assert backed.backend.graphs and len(backed.backend._spare) == 1  # decoded from a graph, kept for the next
