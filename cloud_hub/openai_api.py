"""OpenAI-compatible HTTP API over the hub (FastAPI), plus /metrics and /health.

    /v1/chat/completions   chat messages; `stream: true` answers with server-sent events
    /v1/completions        plain prompt
    /v1/models             models served now (the cloud's and every online device's)
    /v1/embeddings, /tokenize, /detokenize, /tokenizer_info   (cloud_hub.openai_extras)
    /ui                    the fleet page (cloud_hub.ui): devices, recent requests, the router's decisions

Beyond plain chat: logprobs and top_logprobs (chat), logprobs with echo (completions, scoring the
prompt), n choices, usage in the stream (`stream_options.include_usage`), batched completion
prompts, `response_format` (json_object, json_schema) by grammar, tools where a model's template
takes them (a 400 naming the model where it does not).

Budgets travel as an extension field, `"tandem": {"budget": {"ttft_ms": …, "tpot_ms": …,
"energy_j": …, "best_effort": …, "quality_floor": …, "experts": k}}` (the openai client passes it with
`extra_body`), with the device pin (`"device"`), layer skipping (`"skip_ratio"`, `"lossless"`) and
KV prediction (`"kv_prediction"`, `"kv_repair"`) beside the budget; answers carry `"tandem":
{"placements": […], "ttft_ms", "tpot_ms", "energy_j", "skipped_layers", "lossless", "drafted",
"accepted", "kv_depth", "kv_predicted", "kv_repaired_at"}` (a placement's `kv_prediction` or
`skip_ratio`: the hub turned KV prediction or layer skipping on there, under the budget's
quality_floor; `skipped_layers` says which layers; a placement's `experts`, `[{"expert", "weight"}]`: the
subset a MoE² hub selected, with the gate's weights). Errors use OpenAI's format,
`{"error": {"message", "type", "param", "code"}}`, with the matching HTTP status. Unknown request
fields are refused (400), as are bodies over the configured limit (413).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cloud_hub.errors import HubError, InvalidRequest, Overloaded
from cloud_hub.hub_requests import GenerateSpec
from cloud_hub.openai_answer import Answer, prepend, sse
from cloud_hub.openai_extras import add_routes
from cloud_hub.openai_requests import MAX_PROMPTS, ChatRequest, CompletionRequest
from cloud_hub.prompt import prompt_from_value, utf8_size
from cloud_hub.registry import Registry
from cloud_hub.router import Budget
from cloud_hub.service import HubService
from models.errors import InvalidRequest as ModelInvalidRequest
from models.sampling import SamplingParams
from tandem.v1 import tandem_pb2 as pb

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


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": kind}}, status_code=status)


_GENERATING = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings"))


def _hub_error(exc: HubError) -> JSONResponse:
    """A HubError as its HTTP status; an Overloaded (429) says when to retry in Retry-After."""
    response = _error(HTTP_STATUS.get(exc.kind, 500), str(exc), exc.kind, getattr(exc, "binding", None))
    if isinstance(exc, Overloaded):
        response.headers["Retry-After"] = exc.retry_after
    return response


def _spec(body: ChatRequest | CompletionRequest, prompt: Any, served: list[pb.ModelInfo]) -> GenerateSpec:
    """The request (one prompt of it) as the hub's request path takes it. Raises InvalidRequest
    naming the field for text UTF-8 cannot carry, a schema that is not JSON Schema, or tools for a
    model whose chat template takes none (the prompt's own fields are checked by prompt_from_value)."""
    max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens) or 256
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    utf8_size(body.model, "model")
    for i, s in enumerate(stop):
        utf8_size(s, "stop" if isinstance(body.stop, str) else f"stop[{i}]")
    if isinstance(body, ChatRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs: needs logprobs: true")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = None
    else:
        logprobs = body.logprobs
        prompt_logprobs = body.logprobs if body.echo else None
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop,
        n=body.n,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        constraint=_constraint(body, served),
        skip_ratio=body.tandem.skip_ratio,
        lossless=body.tandem.lossless,
        kv_prediction=body.tandem.kv_prediction,
        kv_repair=body.tandem.kv_repair,
    )
    b = body.tandem.budget
    model = "" if body.model in ("", "auto", "tandem") else body.model
    tools = getattr(body, "tools", None) if getattr(body, "tool_choice", None) != "none" else None
    return GenerateSpec(
        prompt_from_value(prompt, tools),
        params,
        Budget(b.ttft_ms, b.tpot_ms, b.energy_j, b.best_effort, b.quality_floor, b.experts),
        model,
        device=body.tandem.device,
    )


def _constraint(body: ChatRequest | CompletionRequest, served: list[pb.ModelInfo]) -> str:
    """SamplingParams.constraint for response_format or tools ("" for free text). Its schemas and
    grammar are checked here (_checked), before routing, so that a bad one is a 400 whichever device
    would have run it."""
    tools = getattr(body, "tools", None)
    choice = getattr(body, "tool_choice", None)
    if tools is not None:
        names = [m.name for m in served if m.chat and (m.name == body.model or body.model in ("", "auto", "tandem"))]
        without = [n for n in names if not next(m for m in served if m.name == n).tools]
        if not names or without:
            raise InvalidRequest(
                f"tools: model {', '.join(repr(n) for n in without or [body.model])} has no tool support "
                "(its chat template does not take tool definitions)"
            )
        if choice not in (None, "none", "auto"):  # required, or a named function: constrained to a call
            return _checked(json.dumps({"tools": tools, "tool_choice": choice}))
    rf = body.response_format
    if rf is None or rf.type == "text":
        return ""
    # keys in the caller's order: the grammar writes properties in the schema's order, as OpenAI does
    return _checked(json.dumps({"response_format": rf.model_dump(by_alias=True, exclude_none=True)}))


def _checked(constraint: str) -> str:
    """`constraint` once its grammar is known to compile (models.grammar.constraint_grammar: no
    tokenizer needed, cached), so that what a device would refuse is a 400 before routing."""
    from models.grammar import constraint_grammar  # the grammar library: only for such requests

    constraint_grammar(constraint)
    return constraint


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


def create_app(
    registry: Registry, service: HubService, max_body_bytes: int = 1 << 20, ui: bool = True, hub_address: str = ""
) -> FastAPI:
    """The hub's HTTP app; with `ui`, the fleet page too (cloud_hub.ui, kept in app.state.ui), whose
    enrollment tokens name `hub_address` (the gRPC address agents dial)."""
    app = FastAPI(title="Tandem hub", docs_url=None, redoc_url=None)
    app.state.ui = None

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

    add_routes(app, service, authorize)  # /v1/embeddings, /tokenize, /detokenize, /tokenizer_info
    if ui:
        from cloud_hub.ui import add_ui

        app.state.ui = add_ui(app, registry, service, hub_address)
    return app


async def _answer(service: HubService, body: ChatRequest | CompletionRequest, chat: bool) -> Response:
    prompts = _prompts(body)
    served = service.placements.models() if getattr(body, "tools", None) is not None else []  # walks the fleet
    specs = [_spec(body, p, served) for p in prompts]  # every prompt checked before any runs
    events = service.generate(specs[0])
    first = await anext(events)  # errors before the first token become a plain HTTP error, not a broken stream
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    answer = Answer(body, chat, rid, created, prompts)
    if body.stream:
        return StreamingResponse(sse(answer, service, specs, first, events), media_type="text/event-stream")
    for i, spec in enumerate(specs):
        stream = prepend(first, events) if i == 0 else service.generate(spec)
        async for ev in stream:
            answer.take(i, ev)
    return JSONResponse(answer.whole())


def _prompts(body: ChatRequest | CompletionRequest) -> list[Any]:
    """The prompts of a request: a chat's messages, or each prompt of a completion's batch."""
    if isinstance(body, ChatRequest):
        return [[{"role": m.role, "content": m.content} for m in body.messages]]
    p = body.prompt
    if isinstance(p, str) or all(isinstance(t, int) for t in p):
        return [p]
    if len(p) > MAX_PROMPTS:
        raise InvalidRequest(f"prompt: {len(p)} prompts in one request; at most {MAX_PROMPTS}")
    return list(p)
