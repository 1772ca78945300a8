"""Grammar-constrained decoding: OpenAI `response_format` and forced tool calls, on llguidance.

A `Grammar` is compiled once per (tokenizer, spec) and shared by every request and thread; each
request takes its own `Constraint` from `Grammar.start()`. A decode loop uses one like this:

    logits = constraint.mask(logits)   # (V,) or (1, V): disallowed ids set to -inf, in place
    tok = sample(...)
    constraint.accept(tok)             # ValueError for a token the grammar does not allow
    if constraint.done: stop           # the grammar is complete; finish_reason "stop"

End-of-sequence ids are allowed exactly where the grammar may end. Output JSON is spelled like
`json.dumps` (", " and ": ", no other whitespace): with free whitespace small models tend to loop on
newlines, and every spelling parses to the same value.

Which library, and why. Evaluated 2026-12 on this repository's CPU host (2 cores shared with other
jobs: means and p99s moved 2-5x between identical runs), torch 2.13.0+cpu. One tokenizer adapter
for all three, from our GGUFTokenizer (token -> bytes: byte-level for SmolLM2, byte fallback for
Gemma 3); greedy generation with `load(name, quant="source")` under json_object and three
json_schema specs (nested object with enums; integer, required and optional fields; array of
bounded strings). "Fill" is the library writing its bitmask for one token; applying it to the
logits is ours and the same for all.

- llguidance 1.9.1: a 3.1 MB wheel with no dependencies, imports in 56 ms. Adapter 0.3-0.6 s
  (SmolLM2, 49k tokens), 2.0-2.8 s (Gemma, 262k). Compile 0.8-2 ms (lazy). Fill mean 94-890 us a
  token, p99 0.4-6 ms (Gemma's open strings cost most). Every output parsed and validated.
- xgrammar 0.2.9: declares torch, transformers and triton (a 286 MB wheel; pip kept torch 2.13.0,
  and the CPU path works with --no-deps + apache-tvm-ffi); imports in 3.8 s (transformers).
  Adapter 0.7-3.2 s. Compile 10-57 ms SmolLM2, 50-370 ms Gemma. Fill mean 75-340 us, p99 0.1-8 ms.
- outlines-core 0.2.14: 2.3 MB, no dependencies. Compile 0.2-0.6 s (SmolLM2 schemas), 5.7-12.4 s
  (Gemma schemas), json_object 12 s (SmolLM2) and 34 s (Gemma). Fill mean 17-1255 us.

- xgrammar is rejected for correctness: a string with `maxLength`/`minLength` compiles to a rule
  that accepts raw control characters (`"x\\x01"`) and rejects every escape (`"x\\n"`), so it can
  produce invalid JSON and cannot produce some valid strings. It also pulls triton and transformers.
- outlines-core is rejected: it compiles a JSON schema to a regex, so "any JSON object" is a
  depth-limited approximation, and compiling it over our vocabularies takes 12 s (SmolLM2) to 34 s
  (Gemma 3), schemas up to 12 s: a request cannot wait for that and a cache does not cover new ones.
- llguidance compiles lazily (about 1 ms), is correct on both tokenizers (strings, escapes, special
  tokens never allowed inside text, EOS only where the grammar may end), installs alone, and its
  mask costs little beside a decode step: on SmolLM2, mask plus accept 0.16-0.19 ms a token (mean
  of benchmarks/structured_output.py's replays; p99 0.4-0.8 ms) against 5.6 ms a decode step on a
  quiet host. Its `%json` blocks in a Lark grammar keep each tool's `$ref`s local, which a
  tool-call grammar needs.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llguidance as llg
import numpy as np
import torch
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from models.errors import InvalidRequest
from models.tokenizer import GGUFTokenizer

GRAMMAR_CACHE_SIZE = 128  # grammars (and schema checks) kept, least recently used dropped: 5-15 ms each to redo
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class JsonStyle:
    """How constrained JSON is spelled; every spelling parses to the same value."""

    item_separator: str = ", "
    """Between array items and object members (json.dumps' default)."""
    key_separator: str = ": "
    """Between a key and its value (json.dumps' default)."""
    whitespace_flexible: bool = False
    """Allow any whitespace between JSON tokens (small models then loop on newlines)."""

    def options(self) -> dict[str, Any]:
        """llguidance's `x-guidance` options for this style."""
        return {
            "item_separator": self.item_separator,
            "key_separator": self.key_separator,
            "whitespace_flexible": self.whitespace_flexible,
        }


STYLE = JsonStyle()


def token_bytes(tokenizer: GGUFTokenizer) -> tuple[list[bytes], frozenset[int]]:
    """The bytes each id stands for in decoded text, and the special ids (b"" here: never text).

    Byte-level vocabularies (SmolLM2) spell bytes with GPT-2's printable alphabet; SentencePiece
    ones (Gemma) write a space as U+2581 and a lone byte as `<0xNN>`. Added non-special tokens
    are literal text. Concatenating the bytes of `encode(text)` gives back `text` exactly.
    """
    special = frozenset(i for i, a in tokenizer.backend.get_added_tokens_decoder().items() if a.special)
    out = [b"" if i in special else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    return out, special


@dataclass(frozen=True, eq=False)  # identity: the grammar cache keys on it
class Vocabulary:
    """A tokenizer as llguidance sees it, for logits of `vocab_size` ids. Built once per pair."""

    lexicon: llg.LLTokenizer
    vocab_size: int
    """Width of the model's logits; ids past the tokenizer's table are never allowed."""
    eos_ids: tuple[int, ...]


class _Wrapped:
    """What llguidance's TokenizerWrapper reads: tokens as bytes, special ids, an encoder."""

    def __init__(self, tokenizer: GGUFTokenizer, vocab_size: int) -> None:
        table, special = token_bytes(tokenizer)
        table = table[:vocab_size]  # ids the logits cannot hold are never chosen
        names = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
        # Special tokens keep their names (llguidance marks them and never matches them as text).
        self.tokens = [names[i].encode() if i in special else b for i, b in enumerate(table)]
        self.tokens += [b""] * (vocab_size - len(self.tokens))  # padding ids: empty, never allowed
        self.special_token_ids = sorted(i for i in special if i < vocab_size)
        self.eos_token_id = tokenizer.info.eos_ids[0]
        self.bos_token_id = tokenizer.info.bos_id
        # The backend, not the GGUFTokenizer: the cache below holds this, and must not keep its key alive.
        self._backend = tokenizer.backend

    def __call__(self, text: str | bytes) -> list[int]:
        """Ids of text (no BOS): llguidance tokenizes forced text with it."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._backend.encode(text, add_special_tokens=False).ids


_VOCABULARIES: weakref.WeakKeyDictionary[GGUFTokenizer, dict[int, Vocabulary]] = weakref.WeakKeyDictionary()
_VOCABULARIES_LOCK = threading.Lock()


def vocabulary(tokenizer: GGUFTokenizer, vocab_size: int) -> Vocabulary:
    """The adapter for `tokenizer` and logits of `vocab_size` ids, built on first use (0.3 s for
    SmolLM2's 49k tokens, 2-3 s for Gemma's 262k) and kept while the tokenizer lives.

    Raises ValueError if an EOS id is not below vocab_size or the tokenizer has no EOS.
    """
    eos = tuple(tokenizer.info.eos_ids)
    if not eos or max(eos) >= vocab_size:
        raise ValueError(f"end-of-sequence ids {eos} must be non-empty and below vocab_size {vocab_size}")
    with _VOCABULARIES_LOCK:  # one build per tokenizer even when requests arrive together
        built = _VOCABULARIES.setdefault(tokenizer, {})
        if vocab_size not in built:
            wrapped = llg.TokenizerWrapper(_Wrapped(tokenizer, vocab_size))
            built[vocab_size] = Vocabulary(llg.LLTokenizer(wrapped, n_vocab=vocab_size, eos_token=list(eos)),
                                           vocab_size, eos)  # fmt: skip
        return built[vocab_size]


class Constraint:
    """One request's position in a grammar. Not thread-safe: one decode loop owns it.

    mask and accept raise RuntimeError if the matcher itself fails (a parser limit of llguidance's
    reached on a pathological schema): a server error for the request, not the caller's fault.
    """

    def __init__(self, matcher: llg.LLMatcher, vocab: Vocabulary) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self._bits = np.zeros((vocab.vocab_size + 31) // 32, dtype=np.int32)  # (ceil(V/32),) llguidance's bitmask
        self._blocked: np.ndarray | None = None  # (V,) bool, True = disallowed; None until computed for this state

    def blocked(self) -> np.ndarray:
        """(V,) bool: True for each id the grammar does not allow next. Computed once per state."""
        if self._blocked is None:
            m = self._matcher
            m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)  # drops the GIL
            if m.is_error():
                raise RuntimeError(f"grammar matcher failed: {m.get_error()}")
            # Inverting the packed words first costs V/8 bytes, not V.
            packed = np.invert(self._bits).view(np.uint8)
            self._blocked = np.unpackbits(packed, count=self._vocab.vocab_size, bitorder="little").view(np.bool_)
        return self._blocked

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) or (1, V) logits with every disallowed id set to -inf, in place; returns them.

        Raises ValueError if the last dimension is not the vocab_size the grammar was built for.
        """
        v = self._vocab.vocab_size
        if logits.shape not in ((v,), (1, v)):
            raise ValueError(f"logits must be (V,) or (1, V) with V={v}, got {tuple(logits.shape)}")
        blocked = self.blocked()
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            # numpy's masked copy is branch-free: torch's masked_fill_ costs 2-4x more at V=262k.
            np.copyto(logits.detach().numpy().reshape(v), -np.inf, where=blocked)
        else:
            ban = torch.from_numpy(blocked).to(logits.device, non_blocking=True)
            logits.masked_fill_(ban.view(logits.shape), float("-inf"))
        return logits

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`. Raises ValueError, leaving the state unchanged, for a token the
        grammar does not allow here. An EOS id once the grammar is done is accepted as a no-op."""
        m, token_id = self._matcher, int(token_id)
        if token_id in self._vocab.eos_ids and m.is_stopped() and not m.is_error():
            return
        if not 0 <= token_id < self._vocab.vocab_size or m.validate_tokens([token_id]) != 1:
            raise ValueError(f"token {token_id} is not allowed by the grammar here")
        if not m.consume_token(token_id):
            raise RuntimeError(f"grammar matcher failed: {m.get_error()}")
        self._blocked = None

    @property
    def done(self) -> bool:
        """The grammar is complete (nothing but EOS may follow): generation must stop."""
        return self._matcher.is_stopped()


class Grammar:
    """A compiled grammar for one vocabulary: immutable, shared across requests and threads."""

    def __init__(self, vocab: Vocabulary, grammar: str) -> None:
        """`grammar`: llguidance's serialized grammar (LLMatcher.grammar_from_*). Raises ValueError
        with llguidance's reason if it does not compile."""
        self.vocab = vocab
        self._prototype = llg.LLMatcher(vocab.lexicon, grammar, log_level=0)  # never advanced
        if self._prototype.is_error():
            raise ValueError(self._prototype.get_error())
        self._lock = threading.Lock()

    def start(self) -> Constraint:
        """A fresh constraint at the grammar's start (a copy of the prototype: about 2 us)."""
        with self._lock:
            return Constraint(self._prototype.deep_copy(), self.vocab)


def _lark_json(schema: Mapping[str, Any], style: JsonStyle) -> str:
    """A `%json` block of a Lark grammar: the schema with our spelling (overrides its x-guidance)."""
    return "%json " + json.dumps({**schema, "x-guidance": style.options()}, ensure_ascii=False)


def _check_schema(schema: Any, field: str) -> dict[str, Any]:
    """The schema if it is a valid JSON Schema object (Draft 2020-12); else InvalidRequest naming field."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{field}: must be a JSON Schema object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{field}: not JSON: {exc}") from None
    problem = _schema_problem(text)
    if problem is not None:
        raise InvalidRequest(f"{field}{problem}")
    return schema


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _schema_problem(schema: str) -> str | None:
    """Why a JSON Schema (as JSON text) is invalid, as "<path>: <reason>"; None if it is valid.
    Cached: checking against the metaschema costs about 2 ms, more than compiling the grammar."""
    try:
        Draft202012Validator.check_schema(json.loads(schema))
    except SchemaError as exc:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        return f"{path}: {exc.instance!r:.80} is not valid JSON Schema: {exc.message}"
    return None


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _lark_problem(lark: str) -> str | None:
    """Why llguidance cannot compile a Lark text (its first line), None if it can. No tokenizer
    needed; about 1.3 ms, so cached."""
    problem = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_lark(lark))
    if not problem or problem.startswith("WARNING"):
        return None
    return problem.splitlines()[0]  # llguidance appends the grammar's text


def _supported(lark: str, field: str) -> str:
    """The Lark text if llguidance compiles it; else InvalidRequest naming field."""
    problem = _lark_problem(lark)
    if problem is not None:
        raise InvalidRequest(f"{field}: not supported for constrained decoding: {problem}")
    return lark


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _compile(vocab: Vocabulary, lark: str) -> Grammar:
    """The compiled grammar of a checked Lark text (see _supported) for one vocabulary."""
    return Grammar(vocab, llg.LLMatcher.grammar_from_lark(lark))


def response_format_grammar(response_format: Mapping[str, Any], style: JsonStyle = STYLE) -> str | None:
    """The Lark grammar for OpenAI's `response_format`, checked: None for {"type": "text"}; any
    JSON object for {"type": "json_object"}; the schema of {"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}} (no schema: any object). Needs no tokenizer: the hub checks a
    request with it before routing.

    Raises InvalidRequest naming the field at fault (`response_format.type`,
    `response_format.json_schema.schema...`); the servers map it to a 400 / INVALID_ARGUMENT.
    """
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("response_format: must be an object with a type")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema, field = ANY_OBJECT, "response_format"
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InvalidRequest("response_format.json_schema: required (an object with a name and a schema)")
        name = spec.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise InvalidRequest(f"response_format.json_schema.name: must match {FUNCTION_NAME.pattern}, got {name!r}")
        field = "response_format.json_schema.schema"
        schema = _check_schema(spec.get("schema", ANY_OBJECT), field)
    else:
        raise InvalidRequest(f"response_format.type: must be text, json_object or json_schema, got {kind!r}")
    return _supported(f"start: {_lark_json(schema, style)}\n", field)


def compile_response_format(
    tokenizer: GGUFTokenizer, vocab_size: int, response_format: Mapping[str, Any], style: JsonStyle = STYLE
) -> Grammar | None:
    """The compiled grammar of `response_format` (see response_format_grammar) for this tokenizer
    and logits of vocab_size ids; None for {"type": "text"}. Raises InvalidRequest as it does."""
    lark = response_format_grammar(response_format, style)
    return None if lark is None else _compile(vocabulary(tokenizer, vocab_size), lark)


def _tools_by_name(tools: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Function name -> (its field, e.g. "tools[2].function.parameters", its parameters schema),
    each schema checked; InvalidRequest names the tool's field at fault."""
    if not isinstance(tools, Sequence) or isinstance(tools, str) or not tools:
        raise InvalidRequest("tools: must be a non-empty list of {type: function, function: {...}}")
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(fn, Mapping):
            raise InvalidRequest(f"tools[{i}]: must be {{type: function, function: {{name, parameters}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise InvalidRequest(f"tools[{i}].function.name: must match {FUNCTION_NAME.pattern}, got {name!r}")
        if name in out:
            raise InvalidRequest(f"tools[{i}].function.name: {name!r} is given twice")
        field = f"tools[{i}].function.parameters"
        out[name] = (field, _check_schema(fn.get("parameters", ANY_OBJECT), field))
    return out


def _chosen(tool_choice: Any, names: Sequence[str]) -> list[str]:
    """The functions tool_choice allows: all for "required", one for {type: function, ...}."""
    if tool_choice == "required":
        return list(names)
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(fn, Mapping) or tool_choice.get("type") != "function":
        raise InvalidRequest(
            f'tool_choice: a constrained call needs "required" or {{type: function, function: {{name}}}}, '
            f'got {tool_choice!r} ("auto" and "none" take no grammar)'
        )
    name = fn.get("name")
    if name not in names:
        raise InvalidRequest(f"tool_choice.function.name: no tool named {name!r}; tools: {', '.join(names)}")
    return [name]


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], tool_choice: Any, style: JsonStyle = STYLE) -> str:
    """The Lark grammar of one forced tool call, checked: `{"name": <function>, "arguments": <object
    matching its parameters>}`, for tool_choice "required" (any tool) or {"type": "function",
    "function": {"name": X}} (that one). Each tool's schema is its own `%json` block, so its `$ref`s
    stay local. Needs no tokenizer.

    Raises InvalidRequest naming the field at fault (`tools[i].function.parameters...`,
    `tool_choice.function.name`, `tool_choice`).
    """
    params = _tools_by_name(tools)
    chosen = _chosen(tool_choice, list(params))
    lines = ["start: " + " | ".join(f"call_{i}" for i in range(len(chosen)))]
    for i, name in enumerate(chosen):
        head = "{" + json.dumps("name") + style.key_separator + json.dumps(name) + style.item_separator
        head += json.dumps("arguments") + style.key_separator
        lines.append(f'call_{i}: {json.dumps(head)} args_{i} "}}"')  # names are [A-Za-z0-9_-]: no escapes
        lines.append(f"args_{i}: {_lark_json(params[name][1], style)}")
    lark = "\n".join(lines) + "\n"
    if _lark_problem(lark) is not None:
        for name in chosen:  # name the tool whose schema llguidance refuses
            field, schema = params[name]
            _supported(f"start: {_lark_json(schema, style)}\n", field)
    return _supported(lark, "tools")


def compile_tool_call(
    tokenizer: GGUFTokenizer, vocab_size: int, tools: Sequence[Mapping[str, Any]], tool_choice: Any,
    style: JsonStyle = STYLE,
) -> Grammar:  # fmt: skip
    """The compiled grammar of one forced tool call (see tool_call_grammar) for this tokenizer and
    logits of vocab_size ids. Raises InvalidRequest as tool_call_grammar does."""
    return _compile(vocabulary(tokenizer, vocab_size), tool_call_grammar(tools, tool_choice, style))


def constraint_grammar(constraint: str) -> str | None:
    """The checked Lark grammar of SamplingParams.constraint: "" (free text) -> None;
    `{"response_format": {...}}` or `{"tools": [...], "tool_choice": ...}` (default "required") as
    JSON. Needs no tokenizer: the hub checks with it before routing, the device compiles the same.

    Raises InvalidRequest naming the field at fault.
    """
    if not constraint:
        return None
    try:
        spec = json.loads(constraint)
    except ValueError as exc:
        raise InvalidRequest(f"constraint: not JSON: {exc}") from None
    if isinstance(spec, dict) and "response_format" in spec:
        return response_format_grammar(spec["response_format"])
    if isinstance(spec, dict) and "tools" in spec:
        return tool_call_grammar(spec["tools"], spec.get("tool_choice", "required"))
    raise InvalidRequest('constraint: expected {"response_format": ...} or {"tools": ..., "tool_choice": ...}')


def compile_constraint(tokenizer: GGUFTokenizer, vocab_size: int, constraint: str) -> Grammar | None:
    """The compiled grammar of SamplingParams.constraint (see constraint_grammar) for this tokenizer
    and logits of vocab_size ids; None for free text. Raises InvalidRequest as it does."""
    lark = constraint_grammar(constraint)
    return None if lark is None else _compile(vocabulary(tokenizer, vocab_size), lark)
