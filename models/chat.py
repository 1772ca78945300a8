"""Chat templates: the Jinja2 template embedded in a GGUF, rendered in a sandbox."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import InvalidRequest

ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise InvalidRequest(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def takes_tools(template: str | None) -> bool:
    """Whether a chat template renders tool definitions (it reads the `tools` variable)."""
    return template is not None and "tools" in template


def validate_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Raise InvalidRequest unless messages is a non-empty list of {role, content} strings."""
    if not messages:
        raise InvalidRequest("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise InvalidRequest(f"message {i} must have exactly the keys 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InvalidRequest(f"message {i}: role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise InvalidRequest(f"message {i}: content must be a string")


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, str]],
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The prompt text for `messages`, ending with the cue for the assistant's turn; `tools` (OpenAI
    tool definitions) go to the template as `tools`, as Hugging Face's templates take them.

    Raises InvalidRequest for malformed messages, for a model without a chat template (a base
    model: send a plain prompt instead), and for tools given to a template that does not use them.
    """
    if tools and not takes_tools(template):
        raise InvalidRequest("tools: this model's chat template does not take tool definitions")
    if not template:
        raise InvalidRequest("this model has no chat template (a base model): send a plain prompt, not messages")
    validate_messages(messages)
    try:
        return _compile(template).render(
            messages=list(messages),
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
            **({"tools": list(tools)} if tools else {}),
        )
    except TemplateError as exc:
        raise InvalidRequest(f"chat template failed: {exc}") from exc
