"""OpenAI-compatible HTTP API over the hub (FastAPI), plus /metrics and /health.

    /v1/chat/completions   chat messages; `stream: true` answers with server-sent events
    /v1/completions        plain prompt
    /v1/models             models served now (the cloud's and every online device's)
    /v1/embeddings, /tokenize, /detokenize, /tokenizer_info   (cloud_hub.openai_extras)

Beyond plain chat: logprobs and top_logprobs (chat), logprobs with echo (completions, scoring the
prompt), n choices, usage in the stream (`stream_options.include_usage`), batched completion
prompts, `response_format` (json_object, json_schema) by grammar, tools where a model's template
takes them (a 400 naming the model where it does not).

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
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.errors import HubError, InvalidRequest, Overloaded
from cloud_hub.openai_extras import add_routes
from cloud_hub.prompt import prompt_from_value, utf8_size
from cloud_hub.registry import Registry
from cloud_hub.router import Budget
from cloud_hub.service import Chunk, Final, GenerateSpec, HubService
from cloud_hub.tokenizers import tokenizer_for
from models.errors import InvalidRequest as ModelInvalidRequest
from models.sampling import MAX_CHOICES, MAX_LOGPROBS, SamplingParams
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import Logprob

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


class TandemExtension(_Strict):
    budget: BudgetBody = BudgetBody()
    device: str = Field("", max_length=128)
    """Pin the request to one device id ("cloud": the hub's own model); empty: the hub chooses."""


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
    )
    b = body.tandem.budget
    model = "" if body.model in ("", "auto", "tandem") else body.model
    tools = getattr(body, "tools", None) if getattr(body, "tool_choice", None) != "none" else None
    return GenerateSpec(
        prompt_from_value(prompt, tools),
        params,
        Budget(b.ttft_ms, b.tpot_ms, b.energy_j, b.best_effort),
        model,
        device=body.tandem.device,
    )


def _constraint(body: ChatRequest | CompletionRequest, served: list[pb.ModelInfo]) -> str:
    """SamplingParams.constraint for response_format or tools ("" for free text). The schema is
    checked here, before routing, so that a bad one is a 400 whichever device would have run it."""
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
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise InvalidRequest("response_format.json_schema: required when type is json_schema")
        try:
            jsonschema.Draft202012Validator.check_schema(rf.json_schema.schema_)
        except jsonschema.SchemaError as exc:
            where = "".join(f"[{p!r}]" for p in exc.path)
            raise InvalidRequest(
                f"response_format.json_schema.schema{where}: not valid JSON Schema: {exc.message}"
            ) from exc
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

    add_routes(app, service, authorize)  # /v1/embeddings, /tokenize, /detokenize, /tokenizer_info
    return app


async def _answer(service: HubService, body: ChatRequest | CompletionRequest, chat: bool) -> Response:
    prompts = _prompts(body)
    served = service.placements.models() if getattr(body, "tools", None) is not None else []  # walks the fleet
    specs = [_spec(body, p, served) for p in prompts]  # every prompt checked before any runs
    events = service.generate(specs[0])
    first = await anext(events)  # errors before the first token become a plain HTTP error, not a broken stream
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    answer = _Answer(body, chat, rid, created, prompts)
    if body.stream:
        return StreamingResponse(_sse(answer, service, specs, first, events), media_type="text/event-stream")
    for i, spec in enumerate(specs):
        stream = _prepend(first, events) if i == 0 else service.generate(spec)
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


@dataclass
class _Choice:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: tuple[Logprob | None, ...] = ()
    prompt_ids: tuple[int, ...] = ()
    finish: str = ""
    streamed_chars: int = 0
    """Characters of the generated tokens streamed so far (their text_offset goes on from here)."""


class _Answer:
    """One request's answer as it arrives: its choices (prompt i's choice j at index i x n + j), the
    last Final of each prompt, and OpenAI's shapes of all of it, whole or a frame at a time."""

    def __init__(
        self, body: ChatRequest | CompletionRequest, chat: bool, rid: str, created: int, prompts: list
    ) -> None:
        self.body, self.chat, self.rid, self.created, self.prompts = body, chat, rid, created, prompts
        self.choices: dict[int, _Choice] = {}
        self.finals: list[Final] = []
        self.top = body.top_logprobs if isinstance(body, ChatRequest) else body.logprobs
        choice = getattr(body, "tool_choice", None)
        self.forced_call = bool(getattr(body, "tools", None)) and choice not in (None, "none", "auto")
        """The answer is a tool call (tool_choice required or named): its JSON becomes `tool_calls`."""
        self.echo = isinstance(body, CompletionRequest) and body.echo
        self.model = body.model

    def take(self, prompt: int, ev: Any) -> tuple[int, _Choice, Chunk] | None:
        """Record one event of prompt `prompt`; returns (index, its choice, the chunk) for a Chunk."""
        if isinstance(ev, Final):
            self.finals.append(ev)
            if ev.placements:
                self.model = ev.placements[-1].model
            for j, reason in enumerate(ev.finish_reasons or (ev.finish_reason,)):
                c = self.choices.setdefault(prompt * self.body.n + j, _Choice())
                c.finish = c.finish or reason
            return None
        if not isinstance(ev, Chunk):
            return None
        index = prompt * self.body.n + ev.index
        c = self.choices.setdefault(index, _Choice())
        c.text += ev.text
        c.ids += ev.token_ids
        c.logprobs += ev.logprobs
        if ev.prompt_logprobs:
            c.prompt_logprobs, c.prompt_ids = ev.prompt_logprobs, ev.prompt_ids
        c.finish = ev.finish_reason or c.finish
        return index, c, ev

    def usage(self) -> dict:
        prompt = sum(f.metrics.prompt_tokens for f in self.finals)
        completion = sum(f.metrics.completion_tokens for f in self.finals)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def tokenizer(self) -> Any:
        return tokenizer_for(self.model)

    def whole(self) -> dict:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            choice: dict[str, Any] = {"index": index, "finish_reason": _finish(c.finish), "logprobs": None}
            if self.chat and self.forced_call:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": [_tool_call(c.text)]}
                choice["finish_reason"] = "tool_calls" if c.finish in ("stop", "eos") else _finish(c.finish)
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
                if self.top is not None or getattr(self.body, "logprobs", False):
                    choice["logprobs"] = {"content": self._chat_entries(c.logprobs)}
            else:
                prefix = self._prompt_text(index) if self.echo else ""
                choice["text"] = prefix + c.text
                if self.top is not None:
                    choice["logprobs"] = self._completion_logprobs(c, index)
            choices.append(choice)
        return {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
            "tandem": _tandem_info(self.finals[0]) if len(self.finals) == 1 else [_tandem_info(f) for f in self.finals],
        }

    def _prompt_text(self, index: int) -> str:
        p = self.prompts[index // self.body.n]
        return p if isinstance(p, str) else self.tokenizer().decode(p, skip_special_tokens=False)

    # -- logprobs in OpenAI's two shapes --------------------------------------------------------------

    def _token(self, token_id: int) -> tuple[str, bytes]:
        raw = self.tokenizer().token_bytes(token_id)
        name = f"token_id:{token_id}" if self.body.return_tokens_as_token_ids else raw.decode("utf-8", "replace")
        return name, raw

    def _chat_entries(self, logprobs: list[Logprob] | tuple[Logprob, ...]) -> list[dict]:
        """Chat's `logprobs.content`: one entry a token, with its top_logprobs."""
        out = []
        for token_id, lp, top in logprobs:
            name, raw = self._token(token_id)
            alts = []
            for t, p in top:
                tname, traw = self._token(t)
                alts.append({"token": tname, "logprob": p, "bytes": list(traw)})
            out.append({"token": name, "logprob": lp, "bytes": list(raw), "top_logprobs": alts})
        return out

    def _completion_logprobs(self, c: _Choice, index: int, new: tuple[Logprob, ...] | None = None) -> dict:
        """Completions' `logprobs`: tokens, token_logprobs, top_logprobs (the chosen token and the k
        most likely, as vLLM gives them) and text_offset into the choice's text. With echo the
        prompt's tokens come first (the first with null logprob: nothing predicts it) and the
        generated ones count from the prompt text's end. `new`: only these tokens (a stream's chunk),
        counted on from the tokens the choice streamed before them (_Choice.streamed_chars)."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        prompt: list[tuple[int, Logprob | None]] = []
        if self.echo and new is None:
            prompt = list(zip(c.prompt_ids, c.prompt_logprobs, strict=False))
        generated = [(lp[0], lp) for lp in (c.logprobs if new is None else new)]
        base = len(self._prompt_text(index)) if self.echo else 0
        offset = 0
        for i, (token_id, lp) in enumerate(prompt + generated):
            if i == len(prompt):  # the generated tokens: after the prompt text (and a stream's earlier tokens)
                offset = base + (c.streamed_chars if new is not None else 0)
            name, raw = self._token(token_id)
            tokens.append(name)
            offsets.append(offset)
            offset += len(raw.decode("utf-8", "replace"))
            if lp is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(lp[1])
            top = {name: lp[1]}
            for t, p in lp[2]:
                top.setdefault(self._token(t)[0], p)
            tops.append(top)
        if new is not None:
            c.streamed_chars = offset - base
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    # -- streaming ----------------------------------------------------------------------------------

    def frame(self, index: int, delta: dict | str, finish: str | None, logprobs: Any = None, extra: dict | None = None):
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        choice["delta" if self.chat else "text"] = delta
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        payload = {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        return f"data: {json.dumps({**payload, **(extra or {})})}\n\n"

    def chunk_frame(self, index: int, c: _Choice, ev: Chunk) -> str:
        """One chunk of a choice as its frame (text, logprobs of its tokens; an echo's prompt first).
        Its finish reason comes in the choice's closing frame."""
        finish = None
        if self.chat:
            logprobs = {"content": self._chat_entries(ev.logprobs)} if ev.logprobs else None
            if self.forced_call:  # the call is sent whole when its choice closes (it must parse first)
                return self.frame(index, {}, finish, logprobs)
            return self.frame(index, {"content": ev.text}, finish, logprobs)
        text, logprobs = ev.text, None
        if self.echo and ev.prompt_ids:  # the first chunk: the prompt first
            text = self._prompt_text(index) + text
            if self.top is not None:  # the prompt's tokens, then this chunk's
                only = _Choice(prompt_logprobs=c.prompt_logprobs, prompt_ids=c.prompt_ids)
                prompt = self._completion_logprobs(only, index)
                mine = self._completion_logprobs(c, index, ev.logprobs)
                logprobs = {k: prompt[k] + mine[k] for k in prompt}
        elif self.top is not None:
            logprobs = self._completion_logprobs(c, index, ev.logprobs)
        return self.frame(index, text, finish, logprobs)


async def _sse(answer: _Answer, service: HubService, specs: list[GenerateSpec], first: Any, events: Any):
    chat = answer.chat
    try:
        for i, spec in enumerate(specs):
            stream = _prepend(first, events) if i == 0 else service.generate(spec)
            if chat:  # each choice opens with the role, as OpenAI's stream does
                for j in range(answer.body.n):
                    yield answer.frame(i * answer.body.n + j, {"role": "assistant", "content": ""}, None)
            async for ev in stream:
                taken = answer.take(i, ev)
                if taken is not None:  # one frame per token, even one whose text is held back for now
                    yield answer.chunk_frame(*taken)
                elif isinstance(ev, Final):  # each choice closes with its finish reason
                    info = {"tandem": _tandem_info(ev)}
                    for j in range(answer.body.n):
                        index = i * answer.body.n + j
                        c = answer.choices.get(index, _Choice())
                        reason = _finish(c.finish or ev.finish_reason)
                        if answer.forced_call:
                            call = {"index": 0, **_tool_call(c.text)}
                            yield answer.frame(index, {"tool_calls": [call]}, None)
                            reason = "tool_calls" if reason == "stop" else reason
                        yield answer.frame(index, {} if chat else "", reason, None, info)
        if answer.body.stream_options is not None and answer.body.stream_options.include_usage:
            payload = {
                "id": answer.rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": answer.created,
                "model": answer.model,
                "choices": [],
                "usage": answer.usage(),
            }
            yield f"data: {json.dumps(payload)}\n\n"
    except HubError as exc:  # after the first byte the status is sent: report the error in the stream
        err = {"message": str(exc), "type": exc.kind, "param": None, "code": exc.kind}
        yield f"data: {json.dumps({'error': err})}\n\n"
    yield "data: [DONE]\n\n"


def _tool_call(text: str) -> dict:
    """A forced call's output (the grammar's {"name": ..., "arguments": {...}}) in OpenAI's shape,
    its arguments a JSON string; an answer cut short by max_tokens keeps its text as the arguments."""
    try:
        call = json.loads(text)
        name, arguments = call["name"], json.dumps(call["arguments"])
    except (ValueError, KeyError, TypeError):
        name, arguments = "", text
    function = {"name": name, "arguments": arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason or "stop")


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item
