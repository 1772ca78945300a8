"""The TensorRT engine (CUDA GPUs): a TensorRT engine built from the ONNX step graph of models.onnx_export.

It consumes the same graph contract the onnxruntime engine runs (input_ids, past_key_i/past_value_i
in; logits, present_key_i/present_value_i out; T and P dynamic), exported with `nbits=False`:
quantized layers become fp32 MatMuls of their dequantized weights, because TensorRT does not run
com.microsoft MatMulNBits. Two optimisation profiles: prefill (T in [1, max_prompt]) and decode
(T = 1), both with P in [0, max_len - T]. The built plan is cached next to the graph, keyed by the
options, the GPU and the TensorRT version. The KV cache stays on the GPU as torch tensors.

TensorRT cannot be installed on the machines this project is developed on (its wheels fetch
NVIDIA's libraries from NVIDIA's own host), so only the import guard is tested here; the ONNX
graph it reads is tested as a contract in tests/test_onnx_engine.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edge_agent.engines.base import EngineUnavailable, InferenceEngine
from models.loaded import LoadedModel
from models.onnx_export import ExportOptions, cached_export, graph_names
from models.runtime import load


def import_tensorrt() -> Any:
    """The tensorrt module; EngineUnavailable saying what is missing otherwise."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineUnavailable(
            "TensorRT is not installed: the tensorrt engine needs NVIDIA TensorRT (pip install tensorrt, "
            "which fetches NVIDIA's libraries) and a CUDA GPU; use the onnxruntime or torch engine here"
        ) from exc
    return tensorrt


@dataclass(frozen=True)
class TensorRTOptions:
    max_prompt: int = 512
    """Longest prompt one prefill call takes (the prefill profile's largest T)."""
    max_len: int = 2048
    """Positions a request may reach (prompt and generated tokens); also the graph's RoPE rows."""
    fp16: bool = True
    """Let TensorRT pick fp16 kernels (inputs, outputs and the KV cache stay fp32)."""
    workspace_mb: int = 1024
    """Builder workspace limit."""


@dataclass
class _Request:
    past: list[Tensor] = field(default_factory=list)
    """(1, K, P, hd) CUDA tensors, in the graph's past_ input order."""
    position: int = 0
    max_len: int = 0


class TensorRTEngine(InferenceEngine):
    """Raises EngineUnavailable at construction without TensorRT or a CUDA GPU."""

    def __init__(self, device: str = "cuda", options: TensorRTOptions = TensorRTOptions()) -> None:
        self._trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineUnavailable("the tensorrt engine needs a CUDA GPU and torch sees none")
        if not device.startswith("cuda"):
            raise EngineUnavailable(f"the tensorrt engine runs on cuda, not {device!r}")
        self.device, self.options = torch.device(device), options
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self.loaded: LoadedModel | None = None
        self._contexts: list[Any] = []  # one execution context per profile: [prefill, decode]
        self._requests: dict[str, _Request] = {}

    def load(self, model: str) -> dict:
        loaded = load(model, prepare=False)  # exported, never run by torch: no packed copy for the CPU kernels
        options = ExportOptions(nbits=False, max_positions=self.options.max_len)
        onnx_path = cached_export(loaded, options)
        self.names = graph_names(loaded.config.n_layers, options)
        self.loaded, self._requests = loaded, {}
        engine = self._trt.Runtime(self._logger).deserialize_cuda_engine(self._plan(onnx_path, loaded))
        self._engine = engine
        self._stream = torch.cuda.Stream(self.device)
        self._contexts = []
        for profile in range(2):
            ctx = engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, self._stream.cuda_stream)
            self._contexts.append(ctx)
        return loaded.describe(str(model))

    def _plan(self, onnx_path: Path, loaded: LoadedModel) -> bytes:
        """The serialized engine, built once and cached beside the graph."""
        trt, opts = self._trt, self.options
        key = json.dumps([asdict(opts), torch.cuda.get_device_name(self.device), trt.__version__])
        plan_path = onnx_path.with_name(f"trt-{hashlib.sha256(key.encode()).hexdigest()[:16]}.plan")
        if plan_path.is_file():
            return plan_path.read_bytes()
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineUnavailable(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
        if opts.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        cfg = loaded.config
        for t_range in ((1, min(16, opts.max_prompt), opts.max_prompt), (1, 1, 1)):  # prefill, decode
            profile = builder.create_optimization_profile()
            profile.set_shape("input_ids", *((1, t) for t in t_range))
            kv = [(1, cfg.n_kv_heads, p, cfg.head_dim) for p in (0, opts.max_len // 2, opts.max_len - t_range[0])]
            for name in self.names.inputs[1:]:
                profile.set_shape(name, *kv)
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineUnavailable(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
        tmp = plan_path.with_name(plan_path.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(bytes(plan))
        os.replace(tmp, plan_path)
        return bytes(plan)

    def _run(self, profile: int, ids: list[int], state: _Request) -> Tensor:
        ctx, cfg = self._contexts[profile], self.loaded.config
        empty = torch.zeros(1, cfg.n_kv_heads, 0, cfg.head_dim, device=self.device)
        past = state.past or [empty] * (len(self.names.inputs) - 1)
        inputs = [torch.tensor([ids], dtype=torch.int64, device=self.device), *past]
        for name, tensor in zip(self.names.inputs, inputs, strict=True):
            ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = [torch.empty(tuple(ctx.get_tensor_shape(n)), device=self.device) for n in self.names.outputs]
        for name, tensor in zip(self.names.outputs, outputs, strict=True):
            ctx.set_tensor_address(name, tensor.data_ptr())
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see its log)")
        self._stream.synchronize()
        state.past = outputs[1:]
        return outputs[0].reshape(-1)

    def prefill(self, request_id: str, ids: Sequence[int], max_len: int) -> Tensor:
        if self.loaded is None:
            raise EngineUnavailable("no model loaded: call load() first")
        if not 0 < len(ids) <= self.options.max_prompt or not len(ids) <= max_len <= self.options.max_len:
            raise ValueError(
                f"{len(ids)} prompt tokens, max_len {max_len}: this engine was built for prompts of 1.."
                f"{self.options.max_prompt} tokens and {self.options.max_len} positions"
            )
        state = self._requests[request_id] = _Request(max_len=max_len)
        logits = self._run(0, list(ids), state)
        state.position = len(ids)
        return logits

    def decode(self, request_id: str, token: int) -> Tensor:
        if request_id not in self._requests:
            raise KeyError(f"unknown request {request_id!r}: prefill it first")
        state = self._requests[request_id]
        if state.position >= state.max_len:
            raise ValueError(f"request {request_id!r} is full: {state.max_len} positions (prefill's max_len)")
        logits = self._run(1, [token], state)
        state.position += 1
        return logits

    def run_layers(self, request_id: str, hidden: Tensor, start: int, end: int, position: int) -> Tensor:
        raise EngineUnavailable("the tensorrt engine runs whole models; use the torch or onnxruntime engine for layers")

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
