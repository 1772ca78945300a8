"""The OpenAI-compatible API's request bodies (pydantic, unknown fields refused): chat and
completions with their extension (budget, device, layer skipping, KV prediction), logprobs, n, response
formats and tools."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.sampling import KV_DEPTHS, MAX_CHOICES, MAX_LOGPROBS, MAX_SKIP_RATIO
from tandem.types import MAX_EXPERTS

MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's limit on /v1/completions' logprobs."""
MAX_PROMPTS = 64
"""Prompts one /v1/completions request may batch."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetBody(_Strict):
    ttft_ms: float = Field(0.0, ge=0)
    tpot_ms: float = Field(0.0, ge=0)
    energy_j: float = Field(0.0, ge=0)
    best_effort: bool = False
    quality_floor: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    """The lowest measured greedy agreement with the unmodified model accepted for a faster variant:
    the hub may turn KV prediction on where the unmodified model misses the budget. 0: never."""
    experts: int = Field(0, ge=0, le=MAX_EXPERTS)
    """MoE² (a hub with router_policy moe2): how many experts answer together, their next-token
    distributions mixed; 0 or 1: one."""


class TandemExtension(_Strict):
    budget: BudgetBody = BudgetBody()
    device: str = Field("", max_length=128)
    """Pin the request to one device id ("cloud": the hub's own model); empty: the hub chooses."""
    skip_ratio: float = Field(0.0, ge=0, le=MAX_SKIP_RATIO, allow_inf_nan=False)
    """Early layer skipping (models.skip): the share of layers decode skips; only devices whose model
    has trained routers serve it. 0: every layer."""
    lossless: bool = False
    """With skip_ratio: the skipping model drafts and the whole model verifies (its output exactly)."""
    kv_prediction: float = Field(0.0, allow_inf_nan=False)
    """KV prediction (models.kvpred): an auxiliary model of this share of the layers (KV_DEPTHS)
    prefills the prompt; only devices whose model has trained predictors serve it. 0: off."""
    kv_repair: bool = False
    """With kv_prediction: the whole model recomputes the true cache between decode steps."""

    @field_validator("kv_prediction")
    @classmethod
    def _kv_depth(cls, depth: float) -> float:
        if depth != 0 and depth not in KV_DEPTHS:
            raise ValueError(f"must be 0 or one of {', '.join(map(str, KV_DEPTHS))}")
        return depth


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # the wire's int64, as gRPC callers have it
    stream: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # the hub's own limit (Limits.max_n) is checked as it validates
    user: str | None = None
    tandem: TandemExtension = TandemExtension()
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    return_tokens_as_token_ids: bool = False
    """vLLM's extension: logprobs name tokens "token_id:N" (exact where a token is part of a character)."""


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None


class CompletionRequest(_Common):
    # text, token ids (as vLLM and llama.cpp accept), or a batch of either: one choice (n) each
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
