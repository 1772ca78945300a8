"""Grammar-constrained decoding (models/grammar.py).

The mask is checked against a brute-force reference on the tiny vocabularies (a finite language:
a token is allowed exactly when some word of it extends the text so far by the token's bytes);
greedy generation with the real models is checked by parsing and validating what comes out.
Tests that need the zoo models skip when they are not pulled (tests/conftest.py's rule).
"""

from __future__ import annotations

import codecs
import json
import re
import threading

import jsonschema
import pytest
import torch

from models.errors import InvalidRequest
from models.grammar import (
    Constraint,
    Grammar,
    compile_constraint,
    compile_response_format,
    compile_tool_call,
    response_format_grammar,
    token_bytes,
    tool_call_grammar,
)
from models.loaded import LoadedModel
from models.tokenizer import GGUFTokenizer
from models.transformer import Step
from tests.conftest import real_model

SMOLLM2, GEMMA = "smollm2-135m-instruct", "gemma3-270m"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {  # nested object, enums
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "sky": {"enum": ["sunny", "cloudy", "rain"]},
        "temperature": {
            "type": "object",
            "properties": {"value": {"type": "integer"}, "unit": {"enum": ["C", "F"]}},
            "required": ["value", "unit"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "sky", "temperature"],
    "additionalProperties": False,
}
FRUITS = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}
    },
    "required": ["items"],
    "additionalProperties": False,
}
CASES = {  # name -> (question, schema or None for json_object)
    "object": ("Give a JSON object with the name and colour of a cat.", None),
    "person": ("Give the name and age of a person called Alice who is 30 years old, as JSON.", PERSON),
    "weather": ("What is the weather in Paris? Answer as JSON.", WEATHER),
    "fruits": ("List three fruits as JSON.", FRUITS),
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"$ref": "#/$defs/unit"}},
                "required": ["city", "unit"],
                "additionalProperties": False,
                "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]


def json_schema(schema: dict | None) -> dict:
    if schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# --- the tiny vocabularies: no downloads -------------------------------------------------------


@pytest.mark.parametrize("text", ["the cat", ' {"a": [1, 2.5e3, "x\\n"]}\n\n\t', "café 漢字 🙂", "  two  spaces"])
def test_token_bytes_spell_the_encoded_text(tiny: LoadedModel, text: str) -> None:
    table, special = token_bytes(tiny.tokenizer)
    ids = tiny.tokenizer.encode(text, add_bos=False)
    assert b"".join(table[i] for i in ids) == text.encode()
    assert all(table[i] == b"" for i in special)


def words_grammar(tok: GGUFTokenizer, vocab_size: int, words: list[str]) -> Grammar:
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"enum": words}}}
    grammar = compile_response_format(tok, vocab_size, rf)
    assert grammar is not None
    return grammar


def reference_allowed(table: list[bytes], eos: tuple[int, ...], language: list[bytes], prefix: bytes) -> set[int]:
    """Brute force over a finite language: a token is allowed when some word extends prefix by it."""
    ok = {i for i, b in enumerate(table) if b and any(w.startswith(prefix + b) for w in language)}
    return ok | (set(eos) if prefix in language else set())


def test_mask_is_the_reference_set_and_keeps_allowed_logits(tiny: LoadedModel) -> None:
    tok, pad = tiny.tokenizer, 7  # logits wider than the tokenizer's table: the padding ids stay masked
    vocab_size = tok.vocab_size + pad
    words = ["the", "tea", "in a", "a"]
    language = [json.dumps(w).encode() for w in words]
    table, _ = token_bytes(tok)
    constraint = words_grammar(tok, vocab_size, words).start()
    prefix, gen = b"", torch.Generator().manual_seed(0)
    target = tok.encode(json.dumps("in a"), add_bos=False)
    for step in range(len(target) + 1):
        logits = torch.randn(1, vocab_size, generator=gen)
        masked = constraint.mask(logits.clone())
        allowed = set(torch.nonzero(masked[0] > float("-inf")).view(-1).tolist())
        if step == len(target):  # complete: the grammar is done, only end-of-sequence may follow
            assert constraint.done and allowed == set(tok.info.eos_ids)
            break
        # The library may allow a subset (it keeps forced text to its canonical tokens), never more.
        assert allowed and allowed <= reference_allowed(table, tok.info.eos_ids, language, prefix)
        assert all(i < tok.vocab_size for i in allowed)
        ids = sorted(allowed)
        torch.testing.assert_close(masked[0, ids], logits[0, ids], rtol=0, atol=0)
        assert target[step] in allowed and not constraint.done
        constraint.accept(target[step])
        prefix += table[target[step]]


def test_open_string_allows_exactly_the_reference_set(tiny: LoadedModel) -> None:
    """Inside a free string: text tokens allowed, control characters, broken UTF-8 and specials not."""
    tok = tiny.tokenizer
    table, special = token_bytes(tok)
    constraint = compile_response_format(tok, tok.vocab_size, json_schema({"type": "string"})).start()
    constraint.accept(tok.encode('"', add_bos=False)[0])
    allowed = set(torch.nonzero(constraint.mask(torch.zeros(tok.vocab_size)) == 0).view(-1).tolist())
    # Reference: text bytes that continue valid UTF-8 are fine inside a JSON string unless they hold
    # a control character; a `"` or `\\` inside a token is left unchecked (it ends or escapes).
    for i, b in enumerate(table):
        if i in special or not b:
            assert i not in allowed
        elif any(c < 0x20 for c in b) or not utf8_prefix(b):
            assert i not in allowed, (i, b)
        elif b'"' not in b and b"\\" not in b and b"\x7f" not in b:  # llguidance also keeps DEL out
            assert i in allowed, (i, b)


def utf8_prefix(b: bytes) -> bool:
    """b starts at a character boundary and is valid UTF-8, perhaps cut inside its last character."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(b, final=False)
    except UnicodeDecodeError:
        return False
    return True


def test_accept_refuses_a_disallowed_token_and_keeps_its_state(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    constraint = words_grammar(tok, tok.vocab_size, ["the"]).start()
    other = tok.encode("x", add_bos=False)[0]
    with pytest.raises(ValueError, match="not allowed"):
        constraint.accept(other)
    with pytest.raises(ValueError, match="not allowed"):
        constraint.accept(tok.vocab_size + 100)  # outside the logits
    with pytest.raises(ValueError, match="not allowed"):
        constraint.accept(tok.info.eos_ids[0])  # the grammar may not end yet
    for t in tok.encode('"the"', add_bos=False):  # the state is unchanged: the word still completes
        constraint.accept(t)
    assert constraint.done
    constraint.accept(tok.info.eos_ids[0])  # end-of-sequence after the end is a no-op


def test_mask_checks_the_logits_shape(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    constraint = words_grammar(tok, tok.vocab_size, ["a"]).start()
    for shape in [(tok.vocab_size + 1,), (2, tok.vocab_size)]:
        with pytest.raises(ValueError, match="logits must be"):
            constraint.mask(torch.zeros(shape))
    full = constraint.mask(torch.zeros(1, tok.vocab_size))
    half = constraint.mask(torch.zeros(1, tok.vocab_size, dtype=torch.float16))  # not float32: torch's path
    assert half.dtype == torch.float16 and torch.equal(half.isinf(), full.isinf())


def test_one_grammar_serves_threads_and_is_cached(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    grammar = words_grammar(tok, tok.vocab_size, ["the", "tea"])
    assert words_grammar(tok, tok.vocab_size, ["the", "tea"]) is grammar  # the LRU cache
    assert words_grammar(tok, tok.vocab_size + 1, ["the", "tea"]) is not grammar
    ids = {w: tok.encode(json.dumps(w), add_bos=False) for w in ("the", "tea")}
    results: list[bool] = []

    def run(word: str) -> None:
        for _ in range(50):
            c: Constraint = grammar.start()
            for t in ids[word]:
                c.mask(torch.zeros(tok.vocab_size))
                c.accept(t)
            results.append(c.done)

    threads = [threading.Thread(target=run, args=(w,)) for w in ("the", "tea", "the", "tea")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 200


def test_text_format_takes_no_grammar(tiny: LoadedModel) -> None:
    assert compile_response_format(tiny.tokenizer, tiny.tokenizer.vocab_size, {"type": "text"}) is None
    assert response_format_grammar({"type": "text"}) is None


BAD_FORMATS = [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema:"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
    (json_schema({"type": "objekt"}), "response_format.json_schema.schema.type: 'objekt' is not valid JSON Schema"),
    (
        json_schema({"type": "object", "properties": {"n": {"type": "string", "maxLength": -1}}}),
        "response_format.json_schema.schema.properties.n.maxLength: -1 is not valid JSON Schema",
    ),
    (json_schema({"type": "string", "format": "no-such-format"}), "response_format.json_schema.schema: not supported"),
]


@pytest.mark.parametrize(("response_format", "field"), BAD_FORMATS)
def test_bad_response_formats_name_the_field(tiny: LoadedModel, response_format: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        compile_response_format(tiny.tokenizer, tiny.tokenizer.vocab_size, response_format)
    assert str(err.value).startswith(field)
    with pytest.raises(InvalidRequest) as early:  # the hub's check before routing: no tokenizer
        response_format_grammar(response_format)
    assert str(early.value) == str(err.value)


def test_constraint_json_is_either_spec(tiny: LoadedModel) -> None:
    """SamplingParams.constraint: the same grammars as the OpenAI fields, from one JSON text."""
    tok, v = tiny.tokenizer, tiny.tokenizer.vocab_size
    rf = json_schema({"enum": ["the"]})
    assert compile_constraint(tok, v, "") is None
    assert compile_constraint(tok, v, json.dumps({"response_format": rf})) is compile_response_format(tok, v, rf)
    required = compile_constraint(tok, v, json.dumps({"tools": TOOLS}))
    assert required is compile_tool_call(tok, v, TOOLS, "required")
    for bad, field in [("{", "constraint: not JSON"), ("[]", "constraint: expected"),
                       (json.dumps({"response_format": {"type": "xml"}}), "response_format.type")]:  # fmt: skip
        with pytest.raises(InvalidRequest, match=f"^{re.escape(field)}"):
            compile_constraint(tok, v, bad)


BAD_TOOLS = [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name: no tool named 'nope'"),
    (TOOLS, "auto", "tool_choice:"),
    ([], "required", "tools:"),
    ([TOOLS[0], {"type": "function", "function": {"name": "x", "parameters": {"type": 3}}}], "required",
     "tools[1].function.parameters.type: 3 is not valid JSON Schema"),
    ([TOOLS[0], {"type": "function", "function": {"name": "x", "parameters": {"format": "zz", "type": "string"}}}],
     "required", "tools[1].function.parameters: not supported"),
    ([TOOLS[0], TOOLS[0]], "required", "tools[1].function.name: 'get_weather' is given twice"),
]  # fmt: skip


@pytest.mark.parametrize(("tools", "choice", "field"), BAD_TOOLS)
def test_bad_tool_calls_name_the_field(tiny: LoadedModel, tools: list, choice: object, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        compile_tool_call(tiny.tokenizer, tiny.tokenizer.vocab_size, tools, choice)
    assert str(err.value).startswith(field)
    with pytest.raises(InvalidRequest) as early:
        tool_call_grammar(tools, choice)
    assert str(early.value) == str(err.value)


# --- the real models, greedy ------------------------------------------------------------------


def source_model(name: str) -> LoadedModel:
    """The zoo model as served (its GGUF's precision): conftest's real_model at "source"."""
    return real_model(name, "source")


def prompt_ids(lm: LoadedModel, question: str) -> list[int]:
    if lm.tokenizer.info.chat_template:
        return lm.generator().encode_prompt([{"role": "user", "content": question}])
    return lm.tokenizer.encode(f"Question: {question}\nAnswer (JSON): ")  # a base model completes


@torch.inference_mode()
def constrained_greedy(lm: LoadedModel, ids: list[int], grammar: Grammar, max_tokens: int = 128) -> str:
    """Greedy decoding under the grammar, the hook Generator gets: mask, choose, accept, stop when done."""
    m, constraint, eos = lm.model, grammar.start(), set(lm.tokenizer.info.eos_ids)
    m.setup_cache(1, len(ids) + max_tokens)
    h = m.forward_layers(m.embed(torch.tensor([ids])), Step.at(0, len(ids)))
    out: list[int] = []
    for t in range(max_tokens):
        tok = int(constraint.mask(m.head(h[:, -1])).argmax())  # head: (1, V)
        constraint.accept(tok)
        if tok in eos or constraint.done:
            out += [] if tok in eos else [tok]
            break
        out.append(tok)
        h = m.forward_layers(m.embed(torch.tensor([[tok]])), Step.at(len(ids) + t, 1))
    assert constraint.done, f"no complete value in {max_tokens} tokens: {lm.tokenizer.decode(out)!r}"
    return lm.tokenizer.decode(out)


@pytest.mark.parametrize("name", [SMOLLM2, GEMMA])
def test_real_token_bytes_spell_the_encoded_text(name: str) -> None:
    tok = source_model(name).tokenizer
    table, special = token_bytes(tok)
    for text in ['{"a": [1, -2.5e3, "x\\n\\u00e9"], "b": null}\n\n\t  ', " café 漢字 🙂 \x7f", "<b>not special</b>"]:
        assert b"".join(table[i] for i in tok.encode(text, add_bos=False)) == text.encode()
    assert set(tok.info.eos_ids) <= special and all(table[i] == b"" for i in special)


@pytest.mark.parametrize("case", list(CASES))
def test_smollm2_output_parses_and_validates(case: str) -> None:
    lm = source_model(SMOLLM2)
    question, schema = CASES[case]
    grammar = compile_response_format(lm.tokenizer, lm.config.vocab_size, json_schema(schema))
    value = json.loads(constrained_greedy(lm, prompt_ids(lm, question), grammar))
    jsonschema.validate(value, schema or {"type": "object"})


def test_gemma_output_parses_and_validates() -> None:
    lm = source_model(GEMMA)  # SentencePiece with byte fallback, 262k ids, a base model
    question, schema = CASES["fruits"]
    grammar = compile_response_format(lm.tokenizer, lm.config.vocab_size, json_schema(schema))
    jsonschema.validate(json.loads(constrained_greedy(lm, prompt_ids(lm, question), grammar)), schema)


@pytest.mark.parametrize(
    ("question", "choice"),
    [
        ("What is the weather in Paris?", "required"),
        ("What is 2 plus 3?", {"type": "function", "function": {"name": "add"}}),
    ],
)
def test_smollm2_tool_call_names_a_tool_with_valid_arguments(question: str, choice: object) -> None:
    lm = source_model(SMOLLM2)
    grammar = compile_tool_call(lm.tokenizer, lm.config.vocab_size, TOOLS, choice)
    call = json.loads(constrained_greedy(lm, prompt_ids(lm, question), grammar))
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert set(call) == {"name", "arguments"} and call["name"] in params
    if isinstance(choice, dict):
        assert call["name"] == choice["function"]["name"]
    jsonschema.validate(call["arguments"], params[call["name"]])
