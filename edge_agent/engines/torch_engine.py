"""The torch engine: our transformer, one KV cache per request, on CPU or CUDA.

On CUDA, decode replays a captured graph per request (edge_agent/engines/cuda_graph.py); a
released request's caches and graph go to a small list of spares (least recently released
dropped first), and the next request whose cache rounds to the same length takes them instead of
capturing again. Each cache length in use costs one capture, once while its spare is kept.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edge_agent.engines.base import EngineUnavailable, InferenceEngine
from edge_agent.engines.cuda_graph import DecodeGraph, decode_step
from models.loaded import LoadedModel
from models.pages import trim_heap
from models.quant import QuantLinear
from models.runtime import load
from models.transformer import RequestState, Step


@dataclass
class _Request:
    state: RequestState  # its caches and RoPE tables, bound to the model while it runs
    position: int
    graph: DecodeGraph | None = None


KV_CACHES = {"auto": None, "fp16": torch.float16, "fp32": torch.float32}


class TorchEngine(InferenceEngine):
    GRAPH_SLOTS = 256  # CUDA caches round up to a multiple of this, so that graphs can be reused
    SPARE_GRAPHS = 4  # released requests' caches and graphs kept for the next requests

    def __init__(
        self, device: str = "cpu", kv_cache: str = "auto", cuda_graphs: bool = True, compile: bool = False
    ) -> None:
        """kv_cache: "auto" keeps fp16 caches for quantized models and the weights' dtype
        otherwise (what the hub's cost model assumes); "fp16" or "fp32" forces one.
        cuda_graphs: on CUDA, decode by replaying a captured graph (ignored on CPU).
        compile: on CUDA with graphs, torch.compile the decode step first, so the graph replays
        fused kernels. Shapes are static, so each new cache length compiles anew (6-70 s on an
        H100): for servers whose requests round to a few lengths."""
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(f"device {device!r} requested but this machine has no CUDA GPU (torch sees none)")
        if not (device == "cpu" or device.startswith("cuda")):
            raise EngineUnavailable(f"the torch engine runs on cpu or cuda, not {device!r}")
        self.device = torch.device(device)
        self.kv_cache = kv_cache
        self.graphs = cuda_graphs and self.device.type == "cuda"
        if compile and not self.graphs:
            raise ValueError("compile=True compiles the CUDA-graph decode step: it needs a cuda device and cuda_graphs")
        self._step = torch.compile(decode_step, dynamic=False) if compile else decode_step
        self.loaded: LoadedModel | None = None
        self._requests: dict[str, _Request] = {}
        self._spare: list[_Request] = []  # released requests with a graph (never None here), oldest first

    def load(self, model: str) -> dict:
        # On CPU, prepared as it loads: the kernels' packed copy now, the mapped sources' pages
        # handed back, the kernels' decoder attached. Elsewhere the packed copy would be dead weight.
        loaded = load(model, prepare=self.device.type == "cpu")
        loaded.model.to(self.device)
        kv_dtype = KV_CACHES[self.kv_cache]
        if self.kv_cache == "auto" and any(isinstance(m, QuantLinear) for m in loaded.model.modules()):
            # Quantized models keep an fp16 KV cache, as partitioner/cost.py assumes: half the
            # bytes each decode step reads at long contexts, and half the cache's memory.
            kv_dtype = torch.float16
        loaded.model.kv_dtype = kv_dtype
        self.loaded = loaded
        # Caches and graphs hold the previous model's weights and shapes: none may outlive it.
        self._spare.clear()
        self._requests.clear()
        # The model's thousands of long-lived objects would otherwise be traversed by every full
        # collection, which decode's small allocations trigger: about 5% of a decode step.
        gc.collect()
        gc.freeze()
        trim_heap()
        return loaded.describe(str(model))

    @property
    def _model(self):
        if self.loaded is None:
            raise EngineUnavailable("no model loaded: call load() first")
        return self.loaded.model

    def _use(self, request_id: str) -> _Request:
        if request_id not in self._requests:
            raise KeyError(f"unknown request {request_id!r}: prefill it first")
        req = self._requests[request_id]
        self._model.bind(req.state)
        return req

    @torch.inference_mode()
    def prefill(self, request_id: str, ids: Sequence[int], max_len: int) -> Tensor:
        m = self._model
        self._check_tokens(ids)
        self.release(request_id)
        if self.graphs:
            max_len = -(-max_len // self.GRAPH_SLOTS) * self.GRAPH_SLOTS
        req = next((r for r in reversed(self._spare) if r.graph.max_len == max_len), None)
        if req is not None:  # a released request's caches (stale slots are never attended) and graph
            self._spare.remove(req)
            req.position = 0
            m.bind(req.state)
        else:
            m.setup_cache(1, max_len)
            req = _Request(m.request_state(), 0)
        self._requests[request_id] = req
        tokens = torch.tensor([list(ids)], device=self.device)
        h = m.forward_layers(m.embed(tokens), Step.at(0, len(ids)))
        req.position = len(ids)
        return m.head(h[:, -1])[0]

    @torch.inference_mode()
    def decode(self, request_id: str, token: int) -> Tensor:
        req, m = self._use(request_id), self._model
        self._check_tokens([token])
        if self.graphs:  # DecodeGraph, like forward_layers, refuses a slot beyond the cache before any kernel
            if req.graph is None:
                req.graph = DecodeGraph(m, token, req.position, self._step)
            logits = req.graph.run(token, req.position)
        else:
            h = m.forward_layers(m.embed(torch.tensor([[token]], device=self.device)), Step.at(req.position, 1))
            logits = m.head(h[:, -1])[0]
        req.position += 1
        return logits

    def _check_tokens(self, ids: Sequence[int]) -> None:
        # An id outside the table would be an IndexError on CPU, but a device-side assert on CUDA,
        # which leaves the whole CUDA context unusable: refuse it here, before any kernel runs.
        vocab = self._model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= int(t) < vocab]
        if bad or not ids:
            raise ValueError(f"token ids must be in [0, {vocab}) and non-empty; got {bad[:5] or 'none'}")

    @torch.inference_mode()
    def run_layers(self, request_id: str, hidden: Tensor, start: int, end: int, position: int) -> Tensor:
        m = self._model
        if request_id not in self._requests:
            m.setup_cache(1, position + hidden.shape[1] + 256)
            self._requests[request_id] = _Request(m.request_state(), position)
        self._use(request_id)
        return m.forward_layers(hidden.to(self.device), Step.at(position, hidden.shape[1]), start, end)

    def release(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None and req.graph is not None and req.graph.model is self._model:
            self._spare.append(req)
            del self._spare[: -self.SPARE_GRAPHS]  # the least recently released go
