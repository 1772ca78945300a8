"""What a request asks of a placement's model variant: layer skipping and KV prediction.

Which candidates can serve a request that names a skip_ratio or a kv_prediction (`skipping`,
`predicting`), when the hub may turn a variant on by itself under Budget.quality_floor (`may_skip`,
`may_predict`), the sampling options a placement runs with once the router chose a variant
(`skip_params`, `kv_params`), and the layer-skipping report an agent's metrics carry.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from cloud_hub.candidates import Candidate
from cloud_hub.errors import InvalidRequest
from models.sampling import SamplingParams
from models.skip import SkipReport
from tandem.v1 import tandem_pb2 as pb


class Request(Protocol):
    """What these functions read of a request (hub_requests.GenerateSpec has it)."""

    model: str
    device: str
    params: SamplingParams


def skip_report(m: pb.Metrics) -> SkipReport | None:
    """The layer-skipping report an agent's WorkDone metrics carry (None: it skipped nothing)."""
    if not (m.skipped_layers or m.lossless):
        return None
    return SkipReport(tuple(m.skipped_layers), m.lossless, m.drafted, m.accepted)


def skipping(candidates: list[Candidate], spec: Request, first: bool) -> list[Candidate]:
    """The candidates that can serve a request with a skip_ratio: those whose model advertises
    layer-skipping routers (ModelInfo.skip_ratios). On the first placement, InvalidRequest naming
    skip_ratio when some could serve the request but none of them skips layers (none at all is left
    to the errors that say the model or device serves nothing)."""
    able = [c for c in candidates if c.skip_ratios]
    if first and candidates and not able:
        which = f"model {spec.model!r}" if spec.model else "any model"
        where = f" on device {spec.device!r}" if spec.device else ""
        raise InvalidRequest(
            f"skip_ratio: no device serves layer skipping for {which}{where} (none has routers trained for "
            "it: tandem models train-routers); send skip_ratio 0"
        )
    return able


def predicting(candidates: list[Candidate], spec: Request, first: bool) -> list[Candidate]:
    """The candidates that can serve a request with a kv_prediction, each set to run it at that depth
    (Candidate.kv, which the router estimates): those whose model advertises a trained variant of it
    (ModelInfo.kv_variants). On the first placement, InvalidRequest naming kv_prediction when some
    could serve the request but none predicts at that depth (as skipping)."""
    depth = spec.params.kv_prediction
    able = []
    for c in candidates:
        v = next((v for v in c.kv_variants if abs(v.depth - depth) < 1e-6), None)
        if v is not None:
            able.append(dataclasses.replace(c, kv=v))
    if first and candidates and not able:
        which = f"model {spec.model!r}" if spec.model else "any model"
        where = f" on device {spec.device!r}" if spec.device else ""
        trained = sorted({v.depth for c in candidates for v in c.kv_variants})
        have = f"trained depths there: {', '.join(f'{d:g}' for d in trained)}" if trained else "none has predictors"
        raise InvalidRequest(
            f"kv_prediction: no device serves KV prediction at depth {depth:g} for {which}{where} ({have}; "
            "train them: tandem models train-kv); send kv_prediction 0"
        )
    return able


def may_predict(params: SamplingParams) -> bool:
    """Whether the hub may turn KV prediction on for a request with these options (the Generator
    refuses it beside layer skipping, several choices or prompt logprobs)."""
    return not (params.skip_ratio or params.n > 1 or params.prompt_logprobs is not None)


def may_skip(params: SamplingParams) -> bool:
    """Whether the hub may turn layer skipping on for a request with these options (the Generator
    refuses it beside KV prediction and several choices; prompt logprobs would come from a model
    the caller did not ask for)."""
    return not (params.skip_ratio or params.kv_prediction or params.n > 1 or params.prompt_logprobs is not None)


def skip_params(c: Candidate, params: SamplingParams) -> SamplingParams:
    """`params` as placement `c` runs them: with skip_ratio at its variant's ratio where the router
    turned layer skipping on (Budget.quality_floor; Candidate.skip), else unchanged."""
    if c.skip is None or not may_skip(params):
        return params
    return dataclasses.replace(params, skip_ratio=c.skip.ratio)


def kv_params(c: Candidate, params: SamplingParams) -> SamplingParams:
    """`params` as placement `c` runs them: with kv_prediction at its variant's depth where the router
    turned KV prediction on (Budget.quality_floor; Candidate.kv), else unchanged."""
    if c.kv is None or params.kv_prediction:
        return params
    return dataclasses.replace(params, kv_prediction=c.kv.depth)
