"""A request's prompt, parsed once where it enters the hub.

gRPC callers send a wire `Input`; HTTP callers send JSON that the OpenAI API turns into a Python
value. Either way the hub makes one `RequestPrompt` at its edge, holding both forms: the wire
`Input` goes to an agent unchanged, the value to the hub's own serving backend, and the size,
kind and routing token count are computed here once, not by a helper per question.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cloud_hub.errors import InvalidRequest
from cloud_hub.registry import model_config
from models.generate import Prompt
from tandem.v1 import tandem_pb2 as pb
from tandem.wire import prompt_of

CHAT_TEMPLATE_TOKENS = 16
"""Tokens a chat template adds around the messages, for routing before the prompt is tokenized."""
CHAT_ROLES = ("system", "user", "assistant")
"""The roles a chat message may have (the OpenAI API's request model names the same three)."""
BYTES_PER_TOKEN = 4
"""Prompt bytes per token for routing (English BPE averages about 4)."""
MAX_TOKEN_ID = 2**32 - 1
"""The wire carries ids as uint32; `check_vocabulary` holds them to the served models' vocabularies."""


@dataclass(frozen=True)
class RequestPrompt:
    """One prompt in both its forms, with what routing and validation need to know of it."""

    wire: pb.Input
    """As the protocol carries it: forwarded to agents unchanged."""
    value: Prompt
    """Text, token ids, or chat messages ({"role", "content"} dicts): for the hub's own backends."""
    kind: str
    """"text", "tokens" or "chat"."""
    size_bytes: int
    """UTF-8 bytes of the text or of all chat contents together; 4 a token for ids."""

    @property
    def chat(self) -> bool:
        """Chat messages, which need a model with a chat template."""
        return self.kind == "chat"

    @property
    def routing_tokens(self) -> int:
        """Prompt tokens for routing: exact for ids, about BYTES_PER_TOKEN bytes a token for text, plus
        the chat template's own tokens for chat."""
        if self.kind == "tokens":
            return len(self.value)
        extra = CHAT_TEMPLATE_TOKENS if self.kind == "chat" else 0
        return max(1, self.size_bytes // BYTES_PER_TOKEN + extra)

    def check_vocabulary(self, model: str, served: Iterable[pb.ModelInfo]) -> None:
        """Hold token ids to the vocabulary of `model`, or of every served model when the request
        names none (ids mean something to one tokenizer only, and routing may pick any model).

        Raises InvalidRequest naming the prompt for an id at or beyond a vocabulary's size, and naming
        the model for a config the hub cannot read (as routing would). A model not served now is left
        to routing, which says so."""
        if self.kind != "tokens" or not self.value:
            return
        top = max(self.value)  # type: ignore[type-var]
        for m in served:
            if model and m.name != model:
                continue
            size = vocab_size(m)
            if top >= size:
                raise InvalidRequest(
                    f"prompt: token id {top} is outside the vocabulary of model {m.name!r} (ids in [0, {size}))"
                )


def prompt_from_wire(inp: pb.Input) -> RequestPrompt:
    """The prompt of a wire Input (protobuf has checked its strings are UTF-8). An Input carrying no
    prompt is an empty text prompt, which validation refuses. Raises InvalidRequest naming the
    message for a role outside CHAT_ROLES."""
    value = prompt_of(inp)
    kind = inp.WhichOneof("kind")
    if kind == "tokens":
        return RequestPrompt(inp, value, "tokens", 4 * len(value))
    if kind == "chat":
        for i, m in enumerate(value):
            _check_role(m["role"], i)
        return RequestPrompt(inp, value, "chat", sum(len(m["content"].encode()) for m in value))
    text = value or ""
    return RequestPrompt(inp, text, "text", len(text.encode()))


def prompt_from_value(prompt: Prompt, tools: list[dict] | None = None) -> RequestPrompt:
    """The prompt of a JSON request: text, token ids, or chat messages (with the tool definitions
    its chat template is to render).

    Raises InvalidRequest naming the field for text that is not valid Unicode (a lone surrogate
    cannot be sent as UTF-8) and for ids outside the wire's range."""
    if isinstance(prompt, str):
        size = utf8_size(prompt, "prompt")  # before protobuf sees it: it cannot encode a surrogate either
        return RequestPrompt(pb.Input(prompt=prompt), prompt, "text", size)
    if prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)  # type: ignore[arg-type]
        if not all(0 <= t <= MAX_TOKEN_ID for t in ids):
            raise InvalidRequest(f"prompt: token ids must be integers in [0, {MAX_TOKEN_ID}]")
        return RequestPrompt(pb.Input(tokens=pb.TokenIds(ids=ids)), ids, "tokens", 4 * len(ids))
    messages = [_message(m, i) for i, m in enumerate(prompt)]
    size = sum(utf8_size(m["content"], f"messages[{i}].content") for i, m in enumerate(messages))
    wire = pb.Input(
        chat=pb.ChatMessages(
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            tools_json=json.dumps(tools) if tools else "",
        )
    )
    return RequestPrompt(wire, messages, "chat", size)


def _message(m: object, i: int) -> dict[str, str]:
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise InvalidRequest(f"messages[{i}]: must have a string role and content")
    utf8_size(m["role"], f"messages[{i}].role")
    _check_role(m["role"], i)
    return {"role": m["role"], "content": m["content"]}


def _check_role(role: str, i: int) -> None:
    if role not in CHAT_ROLES:
        raise InvalidRequest(f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {role!r}")


def utf8_size(text: str, field: str) -> int:
    """Bytes of `text` in UTF-8. Raises InvalidRequest naming `field` for text that UTF-8 cannot carry
    (a lone surrogate: JSON can escape one, protobuf and the tokenizers cannot take it)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{field}: not valid Unicode text ({exc.reason} at position {exc.start})") from exc


def vocab_size(m: pb.ModelInfo) -> int:
    """The vocabulary size a server advertised for a model (its config parsed once per distinct config)."""
    return _vocab_size(m.name, m.config_json)


@functools.lru_cache(maxsize=256)
def _vocab_size(name: str, config_json: str) -> int:
    return model_config(pb.ModelInfo(name=name, config_json=config_json)).vocab_size
