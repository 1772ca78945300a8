"""Shared fixtures: tiny random GGUF models, and the real zoo models when they are pulled."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import torch

from cloud_hub.broker import BrokerConfig, ManagedBroker, find_mosquitto
from models.errors import ModelNotPulled
from models.loaded import LoadedModel
from models.runtime import load
from tests.tiny import TinySpec, write_tiny_gguf

torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session", params=["llama", "gemma3"])
def tiny_path(request: pytest.FixtureRequest, tiny_dir: Path) -> Path:
    # Gemma gets 7 layers so that both sliding and global layers (pattern 6) are exercised, and
    # head_dim 256 because transformers scales queries by query_pre_attn_scalar=256, which a GGUF
    # cannot state (Gemma 3 270M has head_dim 256, so the real model agrees either way).
    if request.param == "llama":
        spec = TinySpec(arch="llama", n_layers=2)
    else:
        spec = TinySpec(arch="gemma3", n_layers=7, n_heads=2, n_kv_heads=1, head_dim=256)
    return write_tiny_gguf(tiny_dir / f"tiny-{request.param}.gguf", spec)


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> LoadedModel:
    return load(tiny_path, use_cache=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session (tests/pg.py)."""
    from tests.pg import pg_bin, postgres_server

    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (make test installs it)")
    with postgres_server() as url:
        yield url


@cache
def _real(name: str) -> LoadedModel:
    return load(name)


def real_model(name: str) -> LoadedModel:
    """A pulled zoo model; skipped when absent, failed instead under TANDEM_REQUIRE_MODELS=1 (make test)."""
    try:
        return _real(name)
    except ModelNotPulled as exc:
        if os.environ.get("TANDEM_REQUIRE_MODELS") == "1":
            raise
        pytest.skip(f"{exc} (make test pulls it)")
        raise  # unreachable: skip raises


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedBroker]:
    """A real Mosquitto managed as the hub runs it, one per test module."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found (Debian: apt-get install mosquitto)")
    with ManagedBroker(BrokerConfig(tmp_path_factory.mktemp("broker"))) as b:
        yield b


@pytest.fixture(scope="module")
def tmp_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throwaway tandem cache (TANDEM_CACHE_DIR) for a module's tiny models: their prepared
    weights and exported graphs."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_CACHE_DIR", str(root))
        yield root


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Exporting the 7-layer tiny gemma3 to ONNX takes about a minute a graph on two cores, so the
    onnxruntime engine's gemma3 cases run with the slow tests (`make test-slow`); llama's, and the
    torch engine's gemma3 cases, stay in the default run."""
    for item in items:
        conformance = item.path.name == "test_engine_conformance.py" and "gemma3-onnxruntime" in item.name
        onnx_engine = item.path.name == "test_onnx_engine.py" and "gemma3" in item.name
        if conformance or onnx_engine:
            item.add_marker(pytest.mark.slow)
