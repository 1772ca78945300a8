"""Embeddings and tokenizers on the hub's OpenAI-compatible HTTP API (cloud_hub.openai_api adds these routes).

    POST /v1/embeddings   OpenAI's shape: `input` is a string, strings, token ids or lists of ids, at most
                          MAX_INPUTS of them; `encoding_format` "float" or "base64" (little-endian float32);
                          `dimensions` only as the model gives them. vLLM's `truncate_prompt_tokens` keeps
                          the first k tokens of each input (-1: as many as the model takes); without it a
                          longer input is refused.
    POST /tokenize        vLLM's shape: {"model", "prompt"} or {"model", "messages"} -> {"count",
                          "max_model_len", "tokens"}; messages are rendered as generation renders them.
    POST /detokenize      vLLM's shape: {"model", "tokens"} -> {"prompt"}

Models: "all-minilm-l6-v2" always, and each model the hub serves now (/v1/models) that it can load itself
(a zoo model, or the GGUF its own backend serves): its mean-pooled last hidden state, and its own tokenizer.
Loading, tokenizing and the forward passes run in a worker thread, never on the event loop. Errors use
OpenAI's shape and name the field at fault: `model`, `input[3]`, `dimensions`, `tokens[0]`.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.errors import HubError
from cloud_hub.service import HubService
from cloud_hub.tokenizers import tokenizer_for
from models.embeddings import MINILM, Embedder, Embedders, EmbeddingsUnavailable, InputError
from models.errors import InvalidRequest, TandemModelError

MAX_INPUTS = 256
"""Inputs one /v1/embeddings request may carry."""

Authorize = Callable[[Request], None]
"""Checks a request's API key; raises cloud_hub.errors.Unauthenticated (the app maps HubError to JSON)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingRequest(_Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    """vLLM's: keep the first k tokens of each input; -1: as many as the model takes. None: refuse longer inputs."""


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class TokenizeRequest(_Strict):
    model: str | None = None
    """None: the hub's default model (default_model)."""
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None
    """Default True for a prompt and False for messages (vLLM's defaults: a chat template writes its own)."""


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class FieldError(Exception):
    """A request refused with an HTTP status, naming the field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, kind: str, message: str, param: str | None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def error_response(status: int, message: str, kind: str, param: str | None) -> JSONResponse:
    """OpenAI's error shape, as cloud_hub.openai_api writes it."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": kind}}, status_code=status)


def add_routes(app: FastAPI, service: HubService, authorize: Authorize, embedders: Embedders | None = None) -> None:
    """Add /v1/embeddings, /tokenize and /detokenize to `app`; `embedders` holds the loaded models (default:
    a cache of two)."""
    cache = embedders if embedders is not None else Embedders(capacity=2)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, exc: FieldError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.kind, exc.param)

    async def model_for(name: str) -> Embedder:
        """The embedder of a model this hub offers; loads it in a worker thread. Raises FieldError naming `model`."""
        served = {m.name for m in service.placements.models()}
        if name != MINILM and name not in served:
            offered = ", ".join([MINILM, *sorted(served)])
            raise FieldError(404, "not_found", f"model {name!r} is not served by this hub (here: {offered})", "model")
        try:
            return await asyncio.to_thread(cache.get, name)
        except EmbeddingsUnavailable as exc:
            raise FieldError(503, "unavailable", str(exc), "model") from exc
        except TandemModelError as exc:  # served by devices only, or its file is not here
            raise FieldError(404, "not_found", f"the hub cannot load {name!r} itself: {exc}", "model") from exc

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
        authorize(request)
        inputs, name_of = _inputs(body.input)
        embedder = await model_for(body.model)
        if body.dimensions is not None and body.dimensions != embedder.dimensions:
            message = (
                f"{body.model} gives {embedder.dimensions} dimensions (it cannot shorten them); got {body.dimensions}"
            )
            raise FieldError(400, "invalid_request", message, "dimensions")
        truncate = body.truncate_prompt_tokens
        if truncate == 0:
            message = "truncate_prompt_tokens must be -1 (the model's limit) or at least 1"
            raise FieldError(400, "invalid_request", message, "truncate_prompt_tokens")
        if truncate == -1:
            truncate = embedder.max_tokens
        try:
            done = await asyncio.to_thread(embedder.embed, inputs, truncate)
        except InputError as exc:
            param = name_of(exc.index, exc.position)
            raise FieldError(400, "invalid_request", f"{param}: {exc.reason}", param) from exc
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(done.vectors)
        ]
        usage = {"prompt_tokens": done.prompt_tokens, "total_tokens": done.prompt_tokens}
        return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
        authorize(request)
        if (body.prompt is None) == (body.messages is None):
            raise FieldError(400, "invalid_request", "send either prompt or messages", "prompt")
        if body.messages is not None and not body.add_generation_prompt:
            message = "only true: the hub renders chat prompts with the assistant's cue, as it generates from them"
            raise FieldError(400, "invalid_request", f"add_generation_prompt: {message}", "add_generation_prompt")
        embedder = await model_for(default_model(service, body.model))
        ids = await asyncio.to_thread(_tokenize, embedder, body)
        return JSONResponse({"count": len(ids), "max_model_len": embedder.max_tokens, "tokens": ids})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request, model: str | None = None) -> JSONResponse:
        """vLLM's /tokenizer_info, what lm-evaluation-harness's remote tokenizer reads first."""
        authorize(request)
        name = default_model(service, model)
        await model_for(name)  # the same 404 for a model the hub does not offer
        try:
            tok = await asyncio.to_thread(tokenizer_for, name)
        except HubError as exc:
            raise FieldError(404, "not_found", str(exc), "model") from exc
        info = tok.info

        def text(token_id: int | None) -> str | None:
            return None if token_id is None else tok.decode([token_id], skip_special_tokens=False)

        eos = info.eos_ids[0] if info.eos_ids else None
        return JSONResponse(
            {
                "model": name,
                "tokenizer_class": "GGUFTokenizer",
                "eos_token": text(eos),
                "bos_token": text(info.bos_id),
                "pad_token": text(eos),
                "chat_template": info.chat_template,
                "add_bos_token": info.add_bos,
                "vocab_size": tok.vocab_size,
            }
        )

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
        authorize(request)
        embedder = await model_for(default_model(service, body.model))
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < embedder.vocab_size), None)
        if bad is not None:
            message = f"tokens[{bad}]: token id {body.tokens[bad]} is outside [0, {embedder.vocab_size})"
            raise FieldError(400, "invalid_request", message, f"tokens[{bad}]")
        return JSONResponse({"prompt": await asyncio.to_thread(embedder.decode, body.tokens)})


def default_model(service: HubService, name: str | None) -> str:
    """The model a tokenizer request means: the one it names, else the hub's own, else the only one
    served (lm-evaluation-harness's remote tokenizer names none). Raises FieldError naming `model`."""
    if name:
        return name
    if service.cloud is not None:
        return service.cloud.model
    served = sorted({m.name for m in service.placements.models()})
    if len(served) == 1:
        return served[0]
    raise FieldError(400, "invalid_request", f"model: required, the hub serves {', '.join(served) or 'none'}", "model")


def _inputs(value: str | list[str] | list[int] | list[list[int]]) -> tuple[list, Callable[[int, int | None], str]]:
    """The request's inputs as a list, and how to name input i (at token position j) as the caller wrote it.
    Raises FieldError naming `input` for none or more than MAX_INPUTS."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):  # one text, or one input's ids

        def one(i: int, j: int | None) -> str:
            return "input" if j is None else f"input[{j}]"

        return [value], one
    if not value:
        raise FieldError(400, "invalid_request", "input must not be empty", "input")
    if len(value) > MAX_INPUTS:
        raise FieldError(400, "invalid_request", f"input has {len(value)} items; at most {MAX_INPUTS}", "input")

    def many(i: int, j: int | None) -> str:
        return f"input[{i}]" if j is None else f"input[{i}][{j}]"

    return list(value), many


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of little-endian float32 (what the openai client decodes)."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _tokenize(embedder: Embedder, body: TokenizeRequest) -> list[int]:
    """Ids of the request's prompt or messages. Raises FieldError naming `messages` for a model without a chat
    template (or messages its template refuses)."""
    if body.prompt is not None:
        return embedder.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    messages = [m.model_dump() for m in body.messages or ()]
    try:
        return embedder.encode_chat(messages, add_special_tokens=bool(body.add_special_tokens))
    except InvalidRequest as exc:
        raise FieldError(400, "invalid_request", f"messages: {exc}", "messages") from exc
