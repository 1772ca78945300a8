"""What a profiled device measured, as a profile file keeps it: the `calibrations` section.

`tandem profile` times one model on one machine (prefill over sequence lengths, decode over context
lengths, the output head and a request's fixed overheads) and writes the samples here together with
the coefficients `partitioner.calibration.fit` found for them. One `Calibration` holds one model as
one engine serves it at one precision: a profile calibrated for SmolLM2 at int4 on the CPU kernels
says nothing about Gemma 3, or about SmolLM2 in fp32, and `DeviceProfile.calibration_for` refuses
to pretend otherwise.

Units: milliseconds for times, tokens for lengths, watts for power. The coefficients' units are in
their docstrings; they are the analytic roofline's own terms (partitioner/cost.py), fitted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Literal

SampleKind = Literal["prefill", "decode", "head", "request"]


class CalibrationError(ValueError):
    """A calibration or one of its samples is invalid; the message names the field."""


@dataclass(frozen=True)
class Sample:
    """One measurement on the device."""

    kind: SampleKind
    """"prefill": one layer's share of prefilling `tokens` tokens (all layers' time / n_layers, the
    output head excluded); "decode": one whole decode step (every layer and the head) attending to
    `tokens` positions; "head": one output-head projection (tokens = 1); "request": a request's fixed
    overhead outside the model (tokenizer, sampling, the work channel; tokens = 0)."""
    tokens: float
    """Prompt length (prefill) or context length (decode); 1 for head, 0 for request."""
    ms: float
    """Measured time, milliseconds (the median of the repeats the profiler ran)."""

    def __post_init__(self) -> None:
        if self.kind not in ("prefill", "decode", "head", "request"):
            raise CalibrationError(f"kind: expected prefill, decode, head or request, got {self.kind!r}")
        if not (math.isfinite(self.ms) and self.ms > 0):
            raise CalibrationError(f"ms: a measured time must be a positive finite number, got {self.ms!r}")
        if not (math.isfinite(self.tokens) and self.tokens >= (1 if self.kind in ("prefill", "decode") else 0)):
            raise CalibrationError(f"tokens: must be a finite count (>= 1 for {self.kind}), got {self.tokens!r}")


@dataclass(frozen=True)
class Calibration:
    """Fitted costs of one model, served by one engine at one precision, on one device.

    Per-layer prefill of L tokens: prefill[0] + prefill[1] x matmul GFLOP + prefill[2] x attention
    GFLOP, where both GFLOP figures are one layer's for L tokens (partitioner.cost.ModelCost).
    One decode step at context c: decode[0] + decode[1] x weight MB read + decode[2] x KV MB read.
    A request adds request_ms once, and its prefill adds head_ms (the head for the last position).
    """

    model: str
    """Zoo name (or bundle name) of the model measured."""
    quant: str
    """Precision served: "source", "int4", "int8" or "fp32" (models.runtime.load's `quant`)."""
    engine: str
    """What computed it: "cpu" (the model's own generator on our kernels) or an edge_agent engine name."""
    prefill: tuple[float, ...]
    """(ms, ms per matmul GFLOP, ms per attention GFLOP) of one layer's prefill."""
    decode: tuple[float, ...]
    """(ms, ms per weight MB, ms per KV-cache MB) of one decode step."""
    head_ms: float = 0.0
    """The output head for one position (in prefill; decode's is inside `decode`)."""
    request_ms: float = 0.0
    """Fixed overhead of one request outside the model."""
    power_w: float = 0.0
    """Mean power measured while computing, watts; 0: no sensor (the profile's figure is an estimate)."""
    power_sensor: str = ""
    """Which sensor measured power_w ("rapl", "ina3221", "nvml"); empty when none did."""
    samples: tuple[Sample, ...] = ()
    """What the coefficients were fitted to."""

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            value = getattr(self, name)
            if len(value) != 3 or not all(math.isfinite(v) and v >= 0 for v in value):
                raise CalibrationError(f"{name}: expected three finite non-negative coefficients, got {value!r}")
        for name in ("head_ms", "request_ms", "power_w"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise CalibrationError(f"{name}: must be a finite non-negative number, got {value!r}")
        if not self.model or not self.quant or not self.engine:
            raise CalibrationError("model, quant and engine must all be named")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model, self.quant, self.engine)

    def to_json(self, samples: bool = False) -> str:
        """Compact JSON (what an agent sends in ModelInfo.calibration_json); samples only when asked."""
        data = dataclasses.asdict(self)
        if not samples:
            data.pop("samples")
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """The inverse of to_json. Raises CalibrationError naming the field for anything malformed."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"expected an object, got {type(data).__name__}")
            samples = tuple(Sample(**s) for s in data.pop("samples", ()))
            data["prefill"], data["decode"] = tuple(data["prefill"]), tuple(data["decode"])
            return cls(**data, samples=samples)
        except CalibrationError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise CalibrationError(f"calibration_json: not a calibration ({exc})") from None
