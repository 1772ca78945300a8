"""Single measurements on this device: one step of the model's own code path, or one of the machine's peaks.

edge_agent.profiler repeats and composes these into the samples a calibration is fitted to and
into a measured profile; each one here times a single thing and knows nothing of grids, retries
or progress.

What each sample means is fixed by device_profiles.Sample, and every measurement here runs the
model's own code path, the one the generator serves requests with:

- "prefill": one layer's share of prefilling T tokens: `Transformer.forward_layers` over a fresh
  cache (PREFILL_CHUNK pieces for long prompts, as in serving), the output head excluded, divided
  by the layers it ran. Every layer of a model costs the same, except that Gemma 3 alternates
  sliding and global layers; a measurement over fewer layers than the model has (to bound a quick
  calibration's time) runs a whole number of that pattern's periods from layer 0, so its mix of
  layers is the model's.
- "decode": one whole step at context c: embed, every layer through the model's single-token
  route ((1, 1, D) into forward_layers: the kernels' CpuDecoder for quantized CPU models), the
  head, and sampling a token. A step's cost does not depend on the values in the cache, only on
  how many positions it attends to, so steps run at positions c, c+1, ... of a cache that was
  never prefilled (its zeros cost what real keys cost), which saves prefilling c tokens first.
- "head": the output projection of one position (what prefill adds after its last layer).
- "request": a request's fixed work outside the model: rendering and tokenizing a short prompt,
  setting up its cache, detokenizing a short answer.

The machine's figures are peaks a profile's efficiencies are shares of: read bandwidth (a sum
over a buffer beyond the caches), fp32 GEMM throughput and, where a sensor exists, the power
while prefilling.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from device_profiles import Sample
from edge_agent.power import PowerSensor, SensorError, detect
from edge_agent.power_meter import EnergyMeter
from models.loaded import LoadedModel
from models.sampling import SamplingParams, sample
from models.transformer import Step, Transformer

log = logging.getLogger("tandem.profiler")

SHORT_PROMPT = "What is the capital of France? Answer in one word."


# -- the model ------------------------------------------------------------------------------------


def _ids(model: Transformer, tokens: int) -> torch.Tensor:
    """(1, T) token ids; the cost does not depend on their values."""
    g = torch.Generator().manual_seed(tokens)
    return torch.randint(0, model.cfg.vocab_size, (1, tokens), generator=g)


def sliding_period(model: Transformer) -> int:
    """Layers in one period of the sliding/global pattern (1 when every layer is alike)."""
    cfg = model.cfg
    return cfg.sliding_window_pattern if cfg.sliding_window > 0 and cfg.sliding_window_pattern > 0 else 1


@torch.inference_mode()
def prefill_times(model: Transformer, tokens: int, repeats: int = 3, layers: int | None = None) -> list[float]:
    """Per-layer ms of each of `repeats` prefills of `tokens` tokens through layers [0, layers)
    (all by default), each on a fresh cache."""
    n = model.cfg.n_layers if layers is None else layers
    if not 1 <= n <= model.cfg.n_layers:
        raise ValueError(f"layers must be in [1, {model.cfg.n_layers}], got {n}")
    h = model.embed(_ids(model, tokens))  # (1, T, D)
    out = []
    for _ in range(repeats):
        model.setup_cache(1, tokens, 0, n)
        t0 = time.perf_counter()
        model.forward_layers(h, Step.at(0, tokens), 0, n)
        out.append(1e3 * (time.perf_counter() - t0) / n)
    return out


def measure_prefill(model: Transformer, tokens: int, repeats: int = 3, layers: int | None = None) -> Sample:
    """One layer's share of prefilling `tokens` tokens: the median over `repeats` (module docstring)."""
    return Sample("prefill", float(tokens), statistics.median(prefill_times(model, tokens, repeats, layers)))


def layers_within(model: Transformer, tokens: int, budget_s: float) -> int:
    """How many layers (whole sliding periods, at least one period) one prefill of `tokens` may run
    to take about `budget_s`, from one timed period (which also warms this length up)."""
    period, n = sliding_period(model), model.cfg.n_layers
    per_layer_s = prefill_times(model, tokens, 1, period)[0] / 1e3
    fit = int(budget_s / per_layer_s) // period * period
    return max(period, min(n, fit))


@torch.inference_mode()
def decode_times(model: Transformer, context: int, steps: int = 8, repeats: int = 3, warmup: int = 2) -> list[float]:
    """Mean ms of one decode step at positions context..context+steps-1, for each of `repeats`
    (after `warmup` untimed steps). The cache is set up for context + steps slots and never
    prefilled: a step costs the same whatever its keys hold (module docstring)."""
    model.setup_cache(1, context + steps)
    params = SamplingParams()  # greedy: a request's default
    tok = torch.zeros(1, dtype=torch.long)

    def run(n: int) -> torch.Tensor:
        nonlocal tok
        for pos in range(context, context + n):
            h = model.embed(tok[:, None])  # (1, 1, D)
            h = model.forward_layers(h, Step.at(pos, 1))  # the single-token route
            tok = sample(model.head(h[:, -1]), params, None)  # (1, V) logits -> (1,)
        return tok

    run(min(warmup, steps))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(steps)
        out.append(1e3 * (time.perf_counter() - t0) / steps)
    return out


def measure_decode(model: Transformer, context: int, steps: int = 8, repeats: int = 3) -> Sample:
    """One decode step at `context` (layers, head and sampling): median over repeats of the mean step."""
    return Sample("decode", float(context), statistics.median(decode_times(model, context, steps, repeats)))


@torch.inference_mode()
def measure_head(model: Transformer, repeats: int = 20) -> Sample:
    """The output head on one position, (1, D) -> (1, V), as prefill runs it: median ms."""
    h = torch.randn(1, model.cfg.dim)
    model.head(h)  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.head(h)
        out.append(1e3 * (time.perf_counter() - t0))
    return Sample("head", 1.0, statistics.median(out))


@torch.inference_mode()
def measure_request(loaded: LoadedModel, repeats: int = 5, new_tokens: int = 64) -> Sample:
    """A request's fixed work outside the model: render and tokenize a short prompt (chat messages
    when the model has a template), set up its cache for `new_tokens` more, and detokenize a
    16-token answer. Median ms over repeats."""
    gen = loaded.generator()
    chat = loaded.tokenizer.info.chat_template is not None
    prompt: Any = [{"role": "user", "content": SHORT_PROMPT}] if chat else SHORT_PROMPT
    out = []
    for i in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        ids = gen.encode_prompt(prompt)
        loaded.model.setup_cache(1, len(ids) + new_tokens)
        loaded.tokenizer.decode(ids[:16])
        if i:
            out.append(1e3 * (time.perf_counter() - t0))
    return Sample("request", 0.0, statistics.median(out))


def release(model: Transformer) -> None:
    """Drop the large caches the measurements set up (a 4096-slot fp32 cache of Gemma 3 is ~150 MB)."""
    model.setup_cache(1, 1)


# -- the machine ------------------------------------------------------------------------------------


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Read bandwidth, 10**9 bytes/s: the best of `repeats` sums over a buffer far beyond the caches
    (what a decode step does with its weights), on torch's threads."""
    x = torch.ones(megabytes * (1 << 20) // 4)  # float32
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def matmul_tflops(n: int = 1536, repeats: int = 3) -> float:
    """fp32 GEMM throughput, 10**12 FLOP/s: the best of `repeats` (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def power_while(work: Callable[[], object], sensors: Sequence[PowerSensor] | None = None) -> tuple[float, str]:
    """Mean watts while `work` runs, by the first of `sensors` (None: what edge_agent.power.detect
    finds on this machine) that reads, and that sensor's kind ("rapl", "ina3221", "nvml"); (0.0, "")
    when none does: the profile then keeps its base's power, an estimate."""
    for sensor in detect() if sensors is None else sensors:
        meter = EnergyMeter(sensor)
        try:
            meter.start()
            work()
            reading = meter.stop()
        except SensorError as exc:
            log.info("power sensor %s not read: %s", sensor.name, exc)
            continue
        if reading.watts > 0:
            return reading.watts, sensor.kind
    return 0.0, ""


def cpu_name() -> str:
    """The CPU's model name as lscpu reports it (else /proc/cpuinfo, else the platform's)."""
    lscpu = shutil.which("lscpu")
    if lscpu:
        out = subprocess.run([lscpu], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def memory_gb() -> float:
    """Physical memory, 10**9 bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
