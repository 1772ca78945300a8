"""Preparing a model to serve on the CPU: one explicit step, taken at load.

`prepare_cpu` packs the quantized layers for the kernels (models.quant.pack_for_kernels, which
hands the memory-mapped sources' pages back as it goes) and attaches the kernels' one-call-a-token
decoder (models.fast_decode.CpuDecoder) to the model's `decoder` slot. A model that skipped it
still computes the same numbers on torch's ops, but each quantized layer packs at its first use
with its mapped source left resident beside the copy, and single tokens decode through ~15 torch
ops a layer instead of one C call.

models.runtime.load and models.bundle.load_bundle take this step unless told not to; code that
builds or quantizes a model itself takes it before serving the model.
"""

from __future__ import annotations

from models import fast_decode
from models.quant import pack_for_kernels
from models.transformer import Transformer


def prepare_cpu(model: Transformer) -> Transformer:
    """Pack `model`'s quantized layers for the kernels and attach the kernels' decoder when they
    can run it (else `decoder` is None: torch's ops), in place; returns the model. A model on
    another device is returned as it is. Taking the step again (after quantizing, or after
    loading other weights) is safe."""
    if model.norm.weight.device.type != "cpu":
        return model
    pack_for_kernels(model)
    model.decoder = None if fast_decode.unsupported(model) else fast_decode.CpuDecoder(model)
    return model
