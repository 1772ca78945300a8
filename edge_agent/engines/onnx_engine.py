"""The onnxruntime engine: the model exported as an ONNX step graph (models.onnx_export), run by onnxruntime.

Quantized bundles run as com.microsoft MatMulNBits over the bundle's own int4/int8 codes, so this
engine computes with exactly the torch engine's weights. Each request's KV cache is a list of
OrtValues, fed back through IO binding: the cache never passes through numpy or torch between steps
(each step's graph concatenates past and new keys into a fresh present, so decode copies a layer's
cache once per step; fine at edge context lengths, and the price of a graph TensorRT also takes).

Graphs are exported once per model and option set and cached under `<cache>/onnx/`; the first
load of a model pays the export (about 10 s for a tiny model, longer for a real one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edge_agent.engines.base import EngineUnavailable, InferenceEngine
from models.loaded import LoadedModel
from models.onnx_export import ExportOptions, cached_export, graph_names
from models.quant import QuantLinear
from models.runtime import load


def import_onnxruntime() -> Any:
    """The onnxruntime module; EngineUnavailable naming the pip extra when it is not installed."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineUnavailable(
            "the onnxruntime engine needs the onnxruntime, onnx and onnxscript packages: "
            "pip install 'tandem[onnx]' (make setup installs them)"
        ) from exc
    return onnxruntime


@dataclass(frozen=True)
class OnnxEngineOptions:
    threads: int | None = None
    """onnxruntime intra-op threads; None: torch.get_num_threads() (onnxruntime's own default may differ)."""
    accuracy_level: int = 0
    """MatMulNBits accuracy_level for quantized models: 0 exact fp32 math, 4 int8 activations (faster, inexact)."""


@dataclass
class _Graph:
    session: Any
    """onnxruntime.InferenceSession of one exported graph."""
    names: Any
    """models.onnx_export.GraphNames of that graph."""


@dataclass
class _Request:
    caches: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    """Layer index -> (key, value) OrtValues of shape (1, K, P, hd)."""
    position: int = 0
    """Positions filled by prefill/decode (the next token's position)."""
    max_len: int = 0
    """Positions the request may fill (prefill's max_len)."""


class OnnxEngine(InferenceEngine):
    """InferenceEngine on onnxruntime. Devices: "cpu", or "cuda[:n]" when onnxruntime has its CUDA provider.

    Raises EngineUnavailable at construction for a missing onnxruntime or an unusable device.
    """

    def __init__(self, device: str = "cpu", options: OnnxEngineOptions = OnnxEngineOptions()) -> None:
        ort = import_onnxruntime()
        self._ort, self.options = ort, options
        if device == "cpu":
            self._providers: list = ["CPUExecutionProvider"]
            self._ort_device, self._device_id = "cpu", 0
        elif device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailable(
                    f"device {device!r} requested but this onnxruntime has no CUDA provider "
                    f"(available: {', '.join(ort.get_available_providers())}); "
                    "install onnxruntime-gpu on a CUDA machine"
                )
            self._device_id = int(device.partition(":")[2] or 0)
            self._providers = [("CUDAExecutionProvider", {"device_id": self._device_id}), "CPUExecutionProvider"]
            self._ort_device = "cuda"
        else:
            raise EngineUnavailable(f"the onnxruntime engine runs on cpu or cuda, not {device!r}")
        self.device = device
        self.loaded: LoadedModel | None = None
        self._whole: _Graph | None = None
        self._ranges: dict[tuple[int, int], _Graph] = {}
        self._requests: dict[str, _Request] = {}

    # -- loading ------------------------------------------------------------------------------------

    def load(self, model: str) -> dict:
        """Load, export (or find the cached export) and open a session. Raises the loader's errors and
        models.onnx_export.UnsupportedQuantization for a quantization MatMulNBits cannot express."""
        loaded = load(model, prepare=False)  # exported, never run by torch: no packed copy for the CPU kernels
        self.loaded, self._ranges, self._requests = loaded, {}, {}
        self._whole = self._open(None)
        quant = next((m for m in loaded.model.layers.modules() if isinstance(m, QuantLinear)), None)
        return loaded.describe(str(model), quant="fp32" if quant is None else f"int{quant.bits}")

    def _open(self, layers: tuple[int, int] | None) -> _Graph:
        if self.loaded is None:
            raise EngineUnavailable("no model loaded: call load() first")
        options = ExportOptions(layers=layers, accuracy_level=self.options.accuracy_level)
        path = cached_export(self.loaded, options)
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = self._ort.InferenceSession(str(path), so, providers=self._providers)
        return _Graph(session, graph_names(self.loaded.config.n_layers, options))

    @property
    def max_positions(self) -> int:
        """Positions a request may reach (rows of the graph's RoPE tables: the model's context length)."""
        if self.loaded is None:
            raise EngineUnavailable("no model loaded: call load() first")
        return self.loaded.config.context_length

    # -- running ------------------------------------------------------------------------------------

    def _value(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(array, self._ort_device, self._device_id)

    def _empty(self) -> Any:
        cfg = self.loaded.config
        return self._value(np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32))

    def _run(self, graph: _Graph, x: np.ndarray, state: _Request) -> Tensor:
        """One graph call: x and the request's caches in, its caches replaced by the presents; returns
        the first output (logits (1, 1, V) or hidden (1, T, D)) as a CPU tensor."""
        io = graph.session.io_binding()
        io.bind_ortvalue_input(graph.names.inputs[0], self._value(x))
        empty = None
        for i in graph.names.layers:
            if i not in state.caches:
                empty = empty or (self._empty(), self._empty())
            k, v = state.caches.get(i, empty)
            io.bind_ortvalue_input(f"past_key_{i}", k)
            io.bind_ortvalue_input(f"past_value_{i}", v)
        for name in graph.names.outputs:
            io.bind_output(name, self._ort_device, self._device_id)
        graph.session.run_with_iobinding(io)
        out = io.get_outputs()
        for n, i in enumerate(graph.names.layers):
            state.caches[i] = (out[1 + 2 * n], out[2 + 2 * n])
        return torch.from_numpy(out[0].numpy())

    def _graph(self) -> _Graph:
        if self._whole is None:
            raise EngineUnavailable("no model loaded: call load() first")
        return self._whole

    def prefill(self, request_id: str, ids: Sequence[int], max_len: int) -> Tensor:
        graph = self._graph()
        if not ids:
            raise ValueError("prefill needs at least one prompt token")
        if not len(ids) <= max_len <= self.max_positions:
            raise ValueError(
                f"{len(ids)} prompt tokens and max_len {max_len}: need len(ids) <= max_len <= "
                f"{self.max_positions} (the model's context)"
            )
        state = _Request(max_len=max_len)
        self._requests[request_id] = state
        logits = self._run(graph, np.asarray([list(ids)], np.int64), state)
        state.position = len(ids)
        return logits.reshape(-1)

    def decode(self, request_id: str, token: int) -> Tensor:
        graph, state = self._graph(), self._use(request_id)
        if state.position >= state.max_len:
            raise ValueError(f"request {request_id!r} is full: {state.max_len} positions (prefill's max_len)")
        logits = self._run(graph, np.asarray([[token]], np.int64), state)
        state.position += 1
        return logits.reshape(-1)

    def run_layers(self, request_id: str, hidden: Tensor, start: int, end: int, position: int) -> Tensor:
        """Layers [start, end) through a graph of that range (exported and cached on first use). Each
        layer's cache must hold exactly `position` entries (a new request starts at 0): no rollback."""
        n_layers = self._require_loaded().config.n_layers
        if not 0 <= start < end <= n_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {n_layers})")
        if (start, end) not in self._ranges:
            self._ranges[start, end] = self._open((start, end))
        state = self._requests.setdefault(request_id, _Request(max_len=self.max_positions))
        for i in range(start, end):
            have = state.caches[i][0].shape()[2] if i in state.caches else 0
            if have != position:
                raise ValueError(
                    f"layer {i} of request {request_id!r} holds {have} positions, the call starts at "
                    f"{position}: the onnxruntime engine only appends"
                )
        x = hidden.detach().to("cpu", torch.float32).contiguous().numpy()
        return self._run(self._ranges[start, end], x, state)

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def _use(self, request_id: str) -> _Request:
        if request_id not in self._requests:
            raise KeyError(f"unknown request {request_id!r}: prefill it first")
        return self._requests[request_id]

    def _require_loaded(self) -> LoadedModel:
        if self.loaded is None:
            raise EngineUnavailable("no model loaded: call load() first")
        return self.loaded
