"""OpenAI-compatible HTTP API over the hub (FastAPI), plus /metrics and /health.

    /v1/chat/completions   chat messages; `stream: true` answers with server-sent events
    /v1/completions        plain prompt
    /v1/models             models served now (the cloud's and every online device's)

Budgets travel as an extension field, `"tandem": {"budget": {"ttft_ms": …, "tpot_ms": …,
"energy_j": …, "best_effort": …}}` (the openai client passes it with `extra_body`); answers carry
`"tandem": {"placements": […], "ttft_ms", "tpot_ms", "energy_j"}`. Errors use OpenAI's format,
`{"error": {"message", "type", "param", "code"}}`, with the matching HTTP status. Unknown request
fields are refused (400), as are bodies over the configured limit (413).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.errors import HubError, Overloaded
from cloud_hub.prompt import prompt_from_value, utf8_size
from cloud_hub.registry import Registry
from cloud_hub.router import Budget
from cloud_hub.service import Chunk, Final, GenerateSpec, HubService, Started
from models.errors import InvalidRequest as ModelInvalidRequest
from models.sampling import SamplingParams

log = logging.getLogger("tandem.hub")

HTTP_STATUS = {
    "invalid_request": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "budget_unsatisfiable": 422,
    "overloaded": 429,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetBody(_Strict):
    ttft_ms: float = Field(0.0, ge=0)
    tpot_ms: float = Field(0.0, ge=0)
    energy_j: float = Field(0.0, ge=0)
    best_effort: bool = False


class TandemExtension(_Strict):
    budget: BudgetBody = BudgetBody()
    device: str = Field("", max_length=128)
    """Pin the request to one device id ("cloud": the hub's own model); empty: the hub chooses."""


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # the wire's int64, as gRPC callers have it
    stream: bool = False
    n: Literal[1] = 1
    user: str | None = None
    tandem: TandemExtension = TandemExtension()
    stream_options: dict[str, bool] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[int] = Field(min_length=1)  # text, or token ids (as vLLM and llama.cpp accept)


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": kind}}, status_code=status)


_GENERATING = frozenset(("/v1/chat/completions", "/v1/completions"))


def _hub_error(exc: HubError) -> JSONResponse:
    """A HubError as its HTTP status; an Overloaded (429) says when to retry in Retry-After."""
    response = _error(HTTP_STATUS.get(exc.kind, 500), str(exc), exc.kind, getattr(exc, "binding", None))
    if isinstance(exc, Overloaded):
        response.headers["Retry-After"] = exc.retry_after
    return response


def _spec(body: ChatRequest | CompletionRequest) -> GenerateSpec:
    """The request as the hub's request path takes it. Raises InvalidRequest naming the field for text
    UTF-8 cannot carry (the prompt's own fields are checked by prompt_from_value)."""
    max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens) or 256
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    utf8_size(body.model, "model")
    for i, s in enumerate(stop):
        utf8_size(s, "stop" if isinstance(body.stop, str) else f"stop[{i}]")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop
    )
    b = body.tandem.budget
    prompt: Any = (
        body.prompt
        if isinstance(body, CompletionRequest)
        else [{"role": m.role, "content": m.content} for m in body.messages]
    )
    model = "" if body.model in ("", "auto", "tandem") else body.model
    return GenerateSpec(
        prompt_from_value(prompt),
        params,
        Budget(b.ttft_ms, b.tpot_ms, b.energy_j, b.best_effort),
        model,
        device=body.tandem.device,
    )


_UNION_TAG = re.compile(r"[a-z-]+\[.*\]|str|int|float|bool")
"""How pydantic names a union's member in an error's location (`prompt.list[int].1`): not a field."""


def _field(loc: tuple) -> str:
    """An error location as the field path the caller wrote: `messages[0].content`, `prompt[1]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _UNION_TAG.fullmatch(str(part)):
            out += f".{part}" if out else str(part)
    return out


def _tandem_info(final: Final) -> dict:
    m = final.metrics
    return {
        "placements": [MessageToDict(p, preserving_proto_field_name=True) for p in final.placements],
        "ttft_ms": m.ttft_ms,
        "tpot_ms": m.tpot_ms,
        "energy_j": m.energy_j,
        "energy": "measured" if m.energy_measured else "estimated",
    }


def create_app(registry: Registry, service: HubService, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="Tandem hub", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return _error(413, f"request body over the limit of {max_body_bytes} bytes", "invalid_request")
        return await call_next(request)

    @app.middleware("http")
    async def internal_errors(request: Request, call_next):
        """The HTTP side of the gRPC error edge (cloud_hub.interceptor): a bug is logged with its
        traceback and a request id; the caller gets a 500 with that id and no traceback."""
        try:
            return await call_next(request)
        except Exception:
            rid = uuid.uuid4().hex[:16]
            log.exception("internal error in %s %s (request id %s)", request.method, request.url.path, rid)
            response = _error(
                500, f"internal error in the hub (request id {rid}); the hub's log has the details", "internal"
            )
            response.headers["x-tandem-request-id"] = rid
            return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        # a body that is not JSON is located by its character offset, which is not a field
        param = (_field(first.get("loc", ())[1:]) if first.get("type") != "json_invalid" else "") or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request", param)

    if service.rate is not None:

        @app.middleware("http")
        async def rate_limit(request: Request, call_next):
            """The per-key rate limit (HubService.admit) on the generating endpoints, before the body is
            read or the key checked: a 429 with Retry-After past it."""
            if request.url.path in _GENERATING:
                value = request.headers.get("authorization", "")
                try:
                    service.admit(value[7:] if value.startswith("Bearer ") else None)
                except HubError as exc:
                    return _hub_error(exc)
            return await call_next(request)

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError) -> JSONResponse:
        return _hub_error(exc)

    @app.exception_handler(ModelInvalidRequest)
    async def model_error(request: Request, exc: ModelInvalidRequest) -> JSONResponse:
        return _error(400, str(exc), "invalid_request")

    def authorize(request: Request) -> None:
        value = request.headers.get("authorization", "")
        registry.check_api_key(value[7:] if value.startswith("Bearer ") else None)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": [m.name for m in service.placements.models()]}

    @app.get("/metrics")
    async def metrics() -> Response:
        fleet = service.fleet
        service.metrics.refresh(
            len(fleet.online()),
            [fleet.telemetry[s.device_id].at for s in fleet.online() if s.device_id in fleet.telemetry],
        )
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "tandem"} for m in service.placements.models()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        authorize(request)
        return await _answer(service, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        authorize(request)
        return await _answer(service, body, chat=False)

    return app


async def _answer(service: HubService, body: ChatRequest | CompletionRequest, chat: bool) -> Response:
    events = service.generate(_spec(body))
    first = await anext(events)  # errors before the first token become a plain HTTP error, not a broken stream
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_sse(first, events, rid, created, body.model, chat), media_type="text/event-stream")
    text, final = "", None
    async for ev in _prepend(first, events):
        if isinstance(ev, Chunk):
            text += ev.text
        elif isinstance(ev, Final):
            final = ev
    assert final is not None
    usage = {
        "prompt_tokens": final.metrics.prompt_tokens,
        "completion_tokens": final.metrics.completion_tokens,
        "total_tokens": final.metrics.prompt_tokens + final.metrics.completion_tokens,
    }
    model = final.placements[-1].model if final.placements else body.model
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(final.finish_reason), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
            "tandem": _tandem_info(final),
        }
    )


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason or "stop")


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


async def _sse(first: Any, events: AsyncIterator[Any], rid: str, created: int, model: str, chat: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def frame(delta: dict | str, finish: str | None, extra: dict | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice["delta" if chat else "text"] = delta
        payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **(extra or {})}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            yield frame({"role": "assistant", "content": ""}, None)
        async for ev in _prepend(first, events):
            if isinstance(ev, Chunk):  # one frame per token, even one whose text is held back for now
                yield frame({"content": ev.text} if chat else ev.text, None)
            elif isinstance(ev, Final):
                yield frame({} if chat else "", _finish(ev.finish_reason), {"tandem": _tandem_info(ev)})
            elif isinstance(ev, Started):
                continue
    except HubError as exc:  # after the first byte the status is sent: report the error in the stream
        err = {"message": str(exc), "type": exc.kind, "param": None, "code": exc.kind}
        yield f"data: {json.dumps({'error': err})}\n\n"
    yield "data: [DONE]\n\n"
