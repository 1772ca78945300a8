"""One OpenAI-compatible answer as the hub's events arrive: its choices, usage and logprobs in
OpenAI's shapes (chat's `logprobs.content`, completions' tokens/token_logprobs/top_logprobs/
text_offset), whole or as server-sent events, and forced tool calls as `tool_calls`."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict

from cloud_hub.errors import HubError
from cloud_hub.hub_requests import Final, GenerateSpec
from cloud_hub.openai_requests import ChatRequest, CompletionRequest
from cloud_hub.progress import Chunk
from cloud_hub.service import HubService
from cloud_hub.tokenizers import tokenizer_for
from tandem.wire import Logprob


def tandem_info(final: Final) -> dict:
    m = final.metrics
    return {
        "placements": [MessageToDict(p, preserving_proto_field_name=True) for p in final.placements],
        "ttft_ms": m.ttft_ms,
        "tpot_ms": m.tpot_ms,
        "energy_j": m.energy_j,
        "energy": "measured" if m.energy_measured else "estimated",
        "skipped_layers": list(m.skipped_layers),  # the layer-skipping report (tandem.skip_ratio)
        "lossless": m.lossless,
        "drafted": m.drafted,
        "accepted": m.accepted,
        "kv_depth": m.kv_depth,  # the KV-prediction report (tandem.kv_prediction, or the hub's choice)
        "kv_predicted": m.kv_predicted,
        "kv_repaired_at": m.kv_repaired_at if m.HasField("kv_repaired_at") else None,
    }


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


class Answer:
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
            "tandem": tandem_info(self.finals[0]) if len(self.finals) == 1 else [tandem_info(f) for f in self.finals],
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


async def sse(answer: Answer, service: HubService, specs: list[GenerateSpec], first: Any, events: Any):
    chat = answer.chat
    try:
        for i, spec in enumerate(specs):
            stream = prepend(first, events) if i == 0 else service.generate(spec)
            if chat:  # each choice opens with the role, as OpenAI's stream does
                for j in range(answer.body.n):
                    yield answer.frame(i * answer.body.n + j, {"role": "assistant", "content": ""}, None)
            async for ev in stream:
                taken = answer.take(i, ev)
                if taken is not None:  # one frame per token, even one whose text is held back for now
                    yield answer.chunk_frame(*taken)
                elif isinstance(ev, Final):  # each choice closes with its finish reason
                    info = {"tandem": tandem_info(ev)}
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


async def prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item
