"""Plain values out of protocol messages, shared by the hub and the agent (which meet only on the wire).

Nothing here knows the models package: sampling comes back as keyword arguments, with the
protocol's zero values meaning "unset" (max_tokens 0 -> 64, top_p 0 -> 1).
"""

from __future__ import annotations

import json

from tandem.v1 import tandem_pb2 as pb

DEFAULT_MAX_TOKENS = 64


def tools_of(inp: pb.Input) -> list[dict] | None:
    """The tool definitions a chat Input carries for its template (None: none)."""
    if inp.WhichOneof("kind") != "chat" or not inp.chat.tools_json:
        return None
    return json.loads(inp.chat.tools_json)


def prompt_of(inp: pb.Input) -> str | list[int] | list[dict[str, str]] | None:
    """The prompt an Input carries: text, token ids or chat messages; None when it carries none."""
    kind = inp.WhichOneof("kind")
    if kind == "prompt":
        return inp.prompt
    if kind == "chat":
        return [{"role": m.role, "content": m.content} for m in inp.chat.messages]
    if kind == "tokens":
        return list(inp.tokens.ids)
    return None


def sampling_kwargs(s: pb.Sampling) -> dict:
    """Keyword arguments for models.sampling.SamplingParams (which validates them)."""
    return {
        "max_tokens": s.max_tokens or DEFAULT_MAX_TOKENS,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p or 1.0,
        "seed": s.seed if s.HasField("seed") else None,
        "stop": tuple(s.stop),
        "n": s.n or 1,
        "logprobs": s.logprobs if s.HasField("logprobs") else None,
        "prompt_logprobs": s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
        "constraint": s.constraint,
        "skip_ratio": s.skip_ratio,
        "lossless": s.lossless,
        "kv_prediction": s.kv_prediction,
        "kv_repair": s.kv_repair,
    }


def sampling_message(
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    n: int = 1,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    constraint: str = "",
    skip_ratio: float = 0.0,
    lossless: bool = False,
    kv_prediction: float = 0.0,
    kv_repair: bool = False,
    **_: object,
) -> pb.Sampling:
    """The wire's Sampling from SamplingParams' fields (`Sampling(**vars(params))` in spirit): the
    inverse of sampling_kwargs."""
    return pb.Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=list(stop),
        n=n if n != 1 else 0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        constraint=constraint,
        skip_ratio=skip_ratio,
        lossless=lossless,
        kv_prediction=kv_prediction,
        kv_repair=kv_repair,
    )


def kv_variant_message(
    depth: float, aux_layers: tuple[int, ...], agreement: float, bpb_ratio: float, prefill_share: float, **_: object
) -> pb.KVVariant:
    """The wire's KVVariant from models.kvpred.KVVariant's fields (`kv_variant_message(**vars(v))`)."""
    return pb.KVVariant(
        depth=depth, aux_layers=aux_layers, agreement=agreement, bpb_ratio=bpb_ratio, prefill_share=prefill_share
    )


def skip_variant_message(ratio: float, layers: int, agreement: float, **_: object) -> pb.SkipVariant:
    """The wire's SkipVariant from models.skip.SkipVariant's fields (`skip_variant_message(**vars(v))`)."""
    return pb.SkipVariant(ratio=ratio, layers=layers, agreement=agreement)


def set_kv_report(metrics: pb.Metrics, depth: float, predicted: int, repaired_at: int | None, **_: object) -> None:
    """Write a request's KV-prediction report (models.kvpred.KVReport's fields:
    `set_kv_report(metrics, **vars(report))`) into its Metrics; the inverse of kv_report_kwargs."""
    metrics.kv_depth, metrics.kv_predicted = depth, predicted
    if repaired_at is not None:
        metrics.kv_repaired_at = repaired_at


def kv_report_kwargs(m: pb.Metrics) -> dict | None:
    """Keyword arguments for models.kvpred.KVReport out of a request's Metrics (None: not predicted)."""
    if not m.kv_depth:
        return None
    repaired = m.kv_repaired_at if m.HasField("kv_repaired_at") else None
    return {"depth": m.kv_depth, "predicted": m.kv_predicted, "repaired_at": repaired}


Logprob = tuple[int, float, tuple[tuple[int, float], ...]]
"""(token id, log-probability, ((id, log-probability) of the most likely tokens, ...))."""


def logprob_message(lp: Logprob | None) -> pb.TokenLogprob:
    """A TokenLogprob message; None (a prompt's first token) -> one marked `none`."""
    if lp is None:
        return pb.TokenLogprob(none=True)
    token_id, logprob, top = lp
    return pb.TokenLogprob(
        token_id=token_id, logprob=logprob, top=[pb.TopLogprob(token_id=i, logprob=p) for i, p in top]
    )


def logprob_of(m: pb.TokenLogprob) -> Logprob | None:
    """The plain value of a TokenLogprob message (None for a prompt's first token)."""
    if m.none:
        return None
    return m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top)
