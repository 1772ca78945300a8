"""Engine registry: name -> "module:Class", imported only when used (no import cycles)."""

from __future__ import annotations

import importlib

from edge_agent.engines.base import EngineUnavailable, InferenceEngine

ENGINES: dict[str, str] = {
    "torch": "edge_agent.engines.torch_engine:TorchEngine",
    "onnxruntime": "edge_agent.engines.onnx_engine:OnnxEngine",
    "tensorrt": "edge_agent.engines.tensorrt_engine:TensorRTEngine",
}


def make_engine(name: str, device: str = "cpu") -> InferenceEngine:
    """Raises EngineUnavailable for an unknown engine or a device it cannot use here."""
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(device)
