"""Hostile inputs for the hub's three ways in, drawn from a seeded `random.Random`.

Each generator returns a `Case`: what to send and what the hub must answer. A *planted* case is a
valid request with exactly one hostile value in one field (a lone surrogate, an id outside the
model's vocabulary, max_tokens below 1, a NaN, a huge or negative number...): the hub must refuse it
with 400 / INVALID_ARGUMENT and a message that starts with that field's name. A *benign-hostile* case
(NULs in text, ids at the top of the vocabulary) must be served. A *chaos* case (random JSON, random
bytes, a request cut short at a random byte) must get one of the allowed codes and nothing else.
Telemetry payloads are JSON objects with hostile values, non-objects, bytes that are not UTF-8 and
truncated documents; whether the ingest must accept one is `telemetry_accepts`, a reference written
independently of `cloud_hub.telemetry`.

Plain functions over plain data, so the default suite can draw a small sample and the slow target
a hundred thousand from the same code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from tandem.v1 import tandem_pb2 as pb

OK = "ok"
"""`Case.expect` for an input the hub must serve."""

SURROGATES = ("\ud800", "\udfff", "x\ud800y", "\udc00\ud800", "a\udbff")
BENIGN_TEXT = ("the cat", "\x00", "a\x00b", "\U0010ffff", "\u202eevil", "é" * 8, "%s%n{}", "\r\n\t", "😀" * 4)
"""Pieces of text the hub must serve; a case joins at most 3, at most 2 messages, well inside the test
model's context of 256 tokens (byte-level: up to 4 tokens a character)."""
HUGE_INTS = (2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63, 2**64, 10**30, -(2**63) - 1, -(10**30))
NUMBERS = (0, 1, -1, -5, 0.5, -0.0, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), *HUGE_INTS)
JUNK = (None, True, False, "", "1", "x" * 300, [], {}, [None], {"a": []}, *SURROGATES, *NUMBERS)


@dataclass(frozen=True)
class Case:
    payload: bytes
    """The HTTP body, the serialized gRPC request (maybe cut short), or the MQTT payload."""
    expect: str | None = None
    """OK, or the field a 400 / INVALID_ARGUMENT must name first, or None: any allowed answer."""
    path: str = ""
    """HTTP: the route."""
    auth: bool = True
    """Whether the caller sends the API key."""


def _text(rng: random.Random, hostile: bool) -> str:
    pieces = [rng.choice(BENIGN_TEXT) for _ in range(rng.randint(1, 3))]
    if hostile:
        pieces.insert(rng.randint(0, len(pieces)), rng.choice(SURROGATES))
    return "".join(pieces)


def _ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    edge = (0, 1, vocab - 2, vocab - 1)
    return [rng.choice(edge) if rng.random() < 0.3 else rng.randrange(vocab) for _ in range(n)]


def _oov(rng: random.Random, vocab: int) -> int:
    """An id the wire can carry but the model cannot take."""
    return rng.choice((vocab, vocab + 1, 2 * vocab, 10**9, 2**32 - 1, rng.randrange(vocab, 2**32)))


# -- HTTP ----------------------------------------------------------------------------------------


def _http_base(rng: random.Random, model: str, vocab: int) -> tuple[str, dict]:
    body: dict = {"model": rng.choice((model, "auto", "")), "max_tokens": rng.randint(1, 3)}
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": _text(rng, False)} for _ in range(rng.randint(1, 2))]
        return "/v1/chat/completions", body
    body["prompt"] = _text(rng, False) if rng.random() < 0.5 else _ids(rng, vocab, rng.randint(1, 6))
    return "/v1/completions", body


def _http_plant(rng: random.Random, path: str, body: dict, vocab: int) -> str:
    """Put one hostile value into `body`; returns the field the hub must name."""
    chat = "messages" in body
    kind = rng.randrange(12)
    if kind == 0 and chat:
        i = rng.randrange(len(body["messages"]))
        body["messages"][i]["content"] = _text(rng, True)
        return f"messages[{i}].content"
    if kind == 1 and chat:
        i = rng.randrange(len(body["messages"]))
        body["messages"][i]["role"] = rng.choice(("robot", "", *SURROGATES))
        return f"messages[{i}].role"
    if kind == 0 or kind == 1:  # a completion: its prompt instead
        body["prompt"] = _text(rng, True)
        return "prompt"
    if kind == 2 and not chat:
        ids = _ids(rng, vocab, rng.randint(0, 4))
        ids.insert(rng.randint(0, len(ids)), rng.choice((_oov(rng, vocab), -1, -(2**40), 2**32, 10**30)))
        body["prompt"] = ids
        return "prompt"
    if kind <= 3 and chat and rng.random() < 0.3:  # its alias: below 1 (above the limit, the limit names max_tokens)
        body["max_completion_tokens"] = rng.choice((0, -1, -(2**63), -(10**30)))
        return "max_completion_tokens"
    if kind <= 3:
        body["max_tokens"] = rng.choice((0, -1, -(2**63), -(10**30), 5000, 2**40))
        return "max_tokens"
    if kind == 4:
        body["temperature"] = rng.choice((-1, 2.5, 1e308, float("nan"), float("inf"), "hot", None))
        return "temperature"
    if kind == 5:
        body["top_p"] = rng.choice((0, -0.5, 1.5, float("nan"), "x"))
        return "top_p"
    if kind == 6:
        body["seed"] = rng.choice((2**63, 2**64, -(2**63) - 1, 10**30, 1.5, "x"))
        return "seed"
    if kind == 7:
        body["stop"] = rng.choice((*SURROGATES, [rng.choice(SURROGATES)], ["ok", rng.choice(SURROGATES)]))
        return "stop"
    if kind == 8:
        body["model"] = rng.choice(SURROGATES)
        return "model"
    if kind == 9:
        name = rng.choice(("ttft_ms", "tpot_ms", "energy_j"))
        body["tandem"] = {"budget": {name: rng.choice((-1, -1e308, float("-inf"), float("nan"), "x"))}}
        return f"tandem.budget.{name}"
    if kind == 10:
        body["n"] = rng.choice((0, 9, -1, 10**30))  # 9: over the hub's default limit of 8 choices
        return "n"
    field = rng.choice(("extra", "\x00", "logit_bias", "functions"))
    body[field] = rng.choice(JUNK)
    return field


def _json_junk(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth > 2 or roll < 0.5:
        return rng.choice(JUNK)
    if roll < 0.75:
        return [_json_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ("model", "messages", "prompt", "max_tokens", "stop", "tandem", "budget", "role", "content", "x")
    return {rng.choice(keys): _json_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def http_case(rng: random.Random, model: str, vocab: int) -> Case:
    """One HTTP request: planted (60%), benign-hostile (10%) or chaos (30%)."""
    roll = rng.random()
    path, body = _http_base(rng, model, vocab)
    if roll < 0.6:
        field = _http_plant(rng, path, body, vocab)
        return Case(json.dumps(body).encode(), field, path)
    if roll < 0.7:
        return Case(json.dumps(body).encode(), OK, path)
    auth = rng.random() < 0.9
    chaos = rng.randrange(4)
    if chaos == 0:  # a valid request cut short
        raw = json.dumps(body).encode()
        return Case(raw[: rng.randrange(len(raw))], None, path, auth)
    if chaos == 1:
        raw = rng.randbytes(rng.randint(0, 200))
    elif chaos == 2:
        raw = json.dumps(_json_junk(rng)).encode()
    else:  # a body of the right shape with junk in its fields
        raw = json.dumps({k: (_json_junk(rng) if rng.random() < 0.4 else v) for k, v in body.items()}).encode()
    return Case(raw, None, rng.choice(("/v1/chat/completions", "/v1/completions")), auth)


# -- gRPC ----------------------------------------------------------------------------------------


def _grpc_base(rng: random.Random, model: str, vocab: int) -> pb.GenerateRequest:
    roll = rng.random()
    if roll < 0.4:
        inp = pb.Input(prompt=_text(rng, False))
    elif roll < 0.7:
        inp = pb.Input(tokens=pb.TokenIds(ids=_ids(rng, vocab, rng.randint(1, 6))))
    else:
        messages = [pb.ChatMessage(role="user", content=_text(rng, False)) for _ in range(rng.randint(1, 2))]
        inp = pb.Input(chat=pb.ChatMessages(messages=messages))
    req = pb.GenerateRequest(
        model=rng.choice((model, "")), input=inp, sampling=pb.Sampling(max_tokens=rng.randint(0, 3))
    )
    if rng.random() < 0.3:
        req.sampling.seed = rng.choice((0, -1, 2**63 - 1, -(2**63)))
    return req


def _grpc_plant(rng: random.Random, req: pb.GenerateRequest, vocab: int) -> str:
    kind = rng.randrange(7)
    if kind <= 1:
        ids = _ids(rng, vocab, rng.randint(0, 4))
        ids.insert(rng.randint(0, len(ids)), _oov(rng, vocab))
        req.input.CopyFrom(pb.Input(tokens=pb.TokenIds(ids=ids)))
        return "prompt"
    if kind == 2:
        req.sampling.max_tokens = rng.choice((5000, 2**20 + 1, 2**31, 2**32 - 1))
        return "max_tokens"
    if kind == 3:
        req.sampling.temperature = rng.choice((-1.0, 101.0, float("nan"), float("inf"), -3.4e38))
        return "temperature"
    if kind == 4:
        req.sampling.top_p = rng.choice((-0.5, 1.5, float("nan"), float("inf")))
        return "top_p"
    if kind == 5:
        setattr(req.budget, rng.choice(("ttft_ms", "tpot_ms", "energy_j")), rng.choice((-1.0, float("nan"), -1e308)))
        return "budget"
    req.input.CopyFrom(rng.choice((pb.Input(), pb.Input(prompt=""), pb.Input(tokens=pb.TokenIds()))))
    return "prompt"


def _bad_utf8_string(rng: random.Random) -> bytes:
    """A GenerateRequest whose model (field 1) or prompt (field 2, then 1) holds bytes that are not
    UTF-8: a surrogate as UTF-8 would encode it, a lone continuation byte, an overlong NUL."""
    bad = rng.choice((b"\xed\xa0\x80", b"x\x80y", b"\xc0\x80", b"\xff", b"a\xed\xbf\xbf"))
    if rng.random() < 0.5:
        return b"\x0a" + bytes([len(bad)]) + bad
    inner = b"\x0a" + bytes([len(bad)]) + bad  # Input.prompt
    return b"\x12" + bytes([len(inner)]) + inner


def grpc_case(rng: random.Random, model: str, vocab: int) -> Case:
    """One serialized GenerateRequest: planted (55%), benign-hostile (10%), not UTF-8 (10%), cut
    short (15%) or random bytes (10%)."""
    roll = rng.random()
    req = _grpc_base(rng, model, vocab)
    if roll < 0.55:
        field = _grpc_plant(rng, req, vocab)
        return Case(req.SerializeToString(), field)
    if roll < 0.65:
        return Case(req.SerializeToString(), OK)
    if roll < 0.75:
        return Case(_bad_utf8_string(rng), "request")
    if roll < 0.9:
        raw = req.SerializeToString()
        return Case(raw[: rng.randrange(len(raw))] if raw else b"", None, auth=rng.random() < 0.9)
    return Case(rng.randbytes(rng.randint(1, 64)), None, auth=rng.random() < 0.9)


# -- telemetry -----------------------------------------------------------------------------------


def telemetry_payload(rng: random.Random) -> bytes:
    """One payload for a device's telemetry topic."""
    keys = ("load", "memory_mb", "power_w", "temperature_c", "queue_depth", "seq", "\x00", "\ud800", "")
    roll = rng.random()
    if roll < 0.5:
        doc = {rng.choice(keys): rng.choice(JUNK) for _ in range(rng.randint(0, 6))}
        raw = json.dumps(doc).encode()
    elif roll < 0.6:
        raw = json.dumps(_json_junk(rng)).encode()
    elif roll < 0.75:  # cut short
        raw = json.dumps({k: rng.choice(NUMBERS) for k in keys[:5]}).encode()
        raw = raw[: rng.randrange(len(raw))]
    elif roll < 0.85:
        raw = rng.randbytes(rng.randint(0, 100))
    elif roll < 0.95:  # not UTF-8, or NULs, inside an object
        raw = b'{"load": "' + rng.choice((b"\xed\xa0\x80", b"\xff", b"\x00", b"\xc0\x80")) + b'"}'
    else:  # a number with more digits than Python will convert
        raw = b'{"load": ' + b"9" * rng.choice((4301, 10_000)) + b"}"
    return raw


def telemetry_accepts(payload: bytes) -> bool:
    """Whether the hub's ingest must take `payload` as telemetry: UTF-8 text holding a JSON object."""
    try:
        return isinstance(json.loads(payload.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False
