"""Plain values out of protocol messages, shared by the hub and the agent (which meet only on the wire).

Nothing here knows the models package: sampling comes back as keyword arguments, with the
protocol's zero values meaning "unset" (max_tokens 0 -> 64, top_p 0 -> 1).
"""

from __future__ import annotations

from tandem.v1 import tandem_pb2 as pb

DEFAULT_MAX_TOKENS = 64


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
    }
