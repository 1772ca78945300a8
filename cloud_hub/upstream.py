"""The cloud side on an existing OpenAI-compatible server: vLLM, llama.cpp's server, TGI, another hub.

The hub keeps the model's GGUF metadata locally (a zoo name or a path), for what the OpenAI API
does not give: the chat template, token ids and the cost model. Every request, chat or not, is
rendered and tokenized here and sent to `/v1/completions` (as token ids, or as the text they
spell for servers that take only text), so that chat, plain prompts and failover continuations
(prompt + tokens already sent) take one path and the upstream sees the tokens our runtime would.
The text it streams back is re-tokenized locally, which is exact for the text (what a later
failover continues from) though token boundaries may differ from the upstream's.

A connection failure or a 5xx answer raises Unavailable (the hub then fails over); a 4xx answer
raises InvalidRequest with the upstream's message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from cloud_hub.backends import Piece, ServingBackend
from cloud_hub.errors import InvalidRequest, Unavailable
from models.generate import Continuation, Prompt
from models.sampling import SamplingParams
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import Logprob

FINISH = {"stop": "stop", "length": "length", "eos": "eos"}


class OpenAIUpstreamBackend(ServingBackend):
    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        upstream_model: str | None = None,
        timeout_s: float = 120.0,
        prompt_format: str = "ids",
    ) -> None:
        from models.runtime import load

        if prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', got {prompt_format!r}")
        self.model = model
        self.upstream_model = upstream_model or model
        self.prompt_format = prompt_format
        self.loaded = load(model, prepare=False)  # tokenizer and config only: the weights are mapped, never run
        self._info = pb.ModelInfo(**self.loaded.describe(model, quant="upstream"))  # the router reads it per request
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def model_info(self) -> pb.ModelInfo:
        return self._info

    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        return self.loaded.generator().encode_prompt(prompt, tools)

    async def stream(
        self, ids: list[int], params: SamplingParams, continuation: Continuation | None = None
    ) -> AsyncIterator[Piece]:
        _check_supported(params, self.model)
        keep, redo, skip = _resume_point(self.loaded.tokenizer, continuation)
        body = {
            "model": self.upstream_model,
            "prompt": self._prompt(ids + keep),
            "max_tokens": params.max_tokens + redo,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM and llama.cpp accept it; OpenAI itself ignores unknowns
        if params.logprobs is not None:  # passed through; vLLM names tokens by id when asked (exact ids)
            body["logprobs"] = params.logprobs
            body["return_tokens_as_token_ids"] = True
        tok = self.loaded.tokenizer
        checked = params.logprobs is None
        try:
            async with self._http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    await _raise_for(response)
                async for line in response.aiter_lines():
                    piece = _piece(line, tok, params.logprobs is not None)
                    if piece is None:
                        continue
                    if not checked and piece.tokens:  # the first token says whether logprobs come back
                        if not piece.logprobs:
                            raise InvalidRequest(
                                f"logprobs: the upstream {self._http.base_url} serving {self.model} returned none; "
                                "it cannot answer requests for logprobs"
                            )
                        checked = True
                    if redo > 0 and piece.tokens:  # a token we already have: only its undelivered text counts
                        redo -= 1
                        piece = Piece(piece.text, (), piece.finish_reason, 0)
                    if skip:
                        cut = min(skip, len(piece.text))
                        skip -= cut
                        piece = Piece(piece.text[cut:], piece.token_ids, piece.finish_reason, piece.tokens)
                    yield piece
        except httpx.TransportError as exc:
            raise Unavailable(f"upstream {self._http.base_url} unreachable: {type(exc).__name__}: {exc}") from exc

    def _prompt(self, ids: list[int]) -> list[int] | str:
        """Token ids (vLLM, llama.cpp's llama-server, another hub), or the text they spell for
        servers that take only text (llama-cpp-python, TGI); those add BOS themselves."""
        if self.prompt_format == "ids":
            return ids
        info = self.loaded.tokenizer.info
        if ids and info.add_bos and ids[0] == info.bos_id:
            ids = ids[1:]
        return self.loaded.tokenizer.decode(ids, skip_special_tokens=False)

    async def aclose(self) -> None:
        await self._http.aclose()


def _resume_point(tok: object, cont: Continuation | None) -> tuple[list[int], int, int]:
    """Where the upstream should go on from: (token ids to send, tokens it must redo, characters of
    its text to drop).

    The upstream decodes only the tokens it generates, so it must not start in the middle of a
    character: if the last tokens sent so far hold an incomplete UTF-8 sequence (their text not yet
    delivered), back up to the last token boundary whose text was delivered whole, have the
    upstream regenerate those tokens (greedy: the same ones), and drop what it repeats.
    """
    if cont is None:
        return [], 0, 0
    ids = list(cont.ids)
    decode = tok.decode  # type: ignore[attr-defined]
    k = len(ids)
    while k > 0:
        text = decode(ids[:k])
        if len(text) <= cont.chars and not text.endswith("\ufffd"):
            break
        k -= 1
    return ids[:k], len(ids) - k, cont.chars - len(decode(ids[:k]))


def _check_supported(params: SamplingParams, model: str) -> None:
    """Refuse, naming the field and the model, what this backend cannot carry to an OpenAI server."""
    if params.n > 1:
        raise InvalidRequest(f"n: {model} is served by an upstream server here, which answers one choice a request")
    if params.prompt_logprobs is not None:
        raise InvalidRequest(f"echo: {model} is served by an upstream server here, which does not score prompts")
    if params.constraint:
        raise InvalidRequest(f"response_format: {model} is served by an upstream server here, without grammars")
    if params.skip_ratio:  # the router never places one here (no ModelInfo.skip_ratios); never ignored either
        raise InvalidRequest(f"skip_ratio: {model} is served by an upstream server here, without layer skipping")
    if params.kv_prediction:  # likewise: no ModelInfo.kv_variants here
        raise InvalidRequest(f"kv_prediction: {model} is served by an upstream server here, without KV prediction")
    if params.logprobs is not None and params.logprobs > 5:
        raise InvalidRequest(f"top_logprobs: {model}'s upstream server gives at most 5, got {params.logprobs}")


def _logprobs(frame: dict, tok: object) -> tuple[Logprob, ...]:
    """A completions frame's logprobs as (id, logprob, top): tokens named "token_id:N" (vLLM's
    return_tokens_as_token_ids) are exact; others are taken as the single token their text encodes
    to, else skipped."""

    def token_id(name: str) -> int | None:
        if name.startswith("token_id:") and name[9:].isdigit():
            return int(name[9:])
        ids = tok.encode(name, add_bos=False)  # type: ignore[attr-defined]
        return ids[0] if len(ids) == 1 else None

    lp = frame.get("logprobs") or {}
    out = []
    for i, (name, value) in enumerate(zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], strict=False)):
        tid = token_id(name)
        if tid is None or value is None:
            continue
        alts = (lp.get("top_logprobs") or [None] * (i + 1))[i] or {}
        top = sorted(((t, float(v)) for n, v in alts.items() if (t := token_id(n)) is not None), key=lambda x: -x[1])
        out.append((tid, float(value), tuple(top)))
    return tuple(out)


def _piece(line: str, tok: object, logprobs: bool = False) -> Piece | None:
    """One SSE line -> a Piece (one token, its text possibly held back), or None for keep-alives,
    frames without choices and [DONE]. With `logprobs`, the frame's logprobs come along."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    frame = json.loads(data)
    if "error" in frame:
        raise Unavailable(f"upstream error mid-stream: {frame['error']}")
    if not frame.get("choices"):  # e.g. a usage-only frame
        return None
    choice = frame["choices"][0]
    text, finish = choice.get("text") or "", choice.get("finish_reason")
    ids = tuple(tok.encode(text, add_bos=False)) if text else ()  # type: ignore[attr-defined]
    # OpenAI-style servers close with a frame that carries only the finish reason: not a token.
    tokens = 0 if finish and not text else 1
    found = _logprobs(choice, tok) if logprobs and tokens else ()
    return Piece(text, ids, FINISH.get(finish, finish) if finish else None, tokens, logprobs=found)


async def _raise_for(response: httpx.Response) -> None:
    raw = (await response.aread()).decode(errors="replace")
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw[:500]
    if response.status_code >= 500 or response.status_code == 429:
        raise Unavailable(f"upstream answered {response.status_code}: {message}")
    raise InvalidRequest(f"upstream refused the request ({response.status_code}): {message}")
