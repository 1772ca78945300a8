"""Shared fixtures: tiny random GGUF models, and the real zoo models when they are pulled."""

from __future__ import annotations

import gc
import logging
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
def _real(name: str, quant: str) -> LoadedModel:
    return load(name, quant=quant)


def real_model(name: str, quant: str = "fp32") -> LoadedModel:
    """A pulled zoo model at `quant` ("source": as agents serve it); skipped when absent, failed
    instead under TANDEM_REQUIRE_MODELS=1 (make test)."""
    try:
        return _real(name, quant)
    except ModelNotPulled as exc:
        if os.environ.get("TANDEM_REQUIRE_MODELS") == "1":
            raise
        pytest.skip(f"{exc} (make test pulls it)")
        raise  # unreachable: skip raises


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    its models are tiny, and two threads on a shared two-core machine wait on each other far longer
    than they compute."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
        if item.path.name in ASYNCIO_STRICT_MODULES:
            item.add_marker(pytest.mark.asyncio_strict)
        if item.get_closest_marker("asyncio_strict") is not None:
            # after the ini's filters, so they win: warnings are errors, the ini's ignores still hold
            item.add_marker(pytest.mark.filterwarnings("error", *item.config.getini("filterwarnings")))


# -- asyncio_strict: loop debug, warnings as errors, no unhandled asyncio errors ----------------------

ASYNCIO_STRICT_MODULES = frozenset(
    ("test_failover.py", "test_restarts.py", "test_fuzz.py", "test_agent_shutdown.py", "test_file_modes.py")
)
"""Modules whose tests all run as `asyncio_strict` (the hub and agent across kills and restarts)."""


class _LoopErrors(logging.Handler):
    """ERROR records of the `asyncio` logger: what a loop reports of a task destroyed pending, an
    exception never retrieved, a callback that raised or an async generator that failed to close."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_STRICT_KEY = pytest.StashKey[tuple[_LoopErrors, str | None]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Before any fixture makes a loop: PYTHONASYNCIODEBUG=1 (read when a loop is made, also by the
    agents the test spawns) and a handler collecting asyncio's error records."""
    if item.get_closest_marker("asyncio_strict") is not None:
        handler = _LoopErrors()
        logging.getLogger("asyncio").addHandler(handler)
        item.stash[_STRICT_KEY] = (handler, os.environ.get("PYTHONASYNCIODEBUG"))
        os.environ["PYTHONASYNCIODEBUG"] = "1"
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    result = yield
    if _STRICT_KEY in item.stash:
        gc.collect()  # while the test's loop is open: a task only the garbage held is reported now
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After every fixture (and the test's loop) is gone: restore the environment and fail the test
    if asyncio reported anything unhandled."""
    result = yield
    if _STRICT_KEY in item.stash:
        handler, before = item.stash[_STRICT_KEY]
        gc.collect()
        logging.getLogger("asyncio").removeHandler(handler)
        if before is None:
            os.environ.pop("PYTHONASYNCIODEBUG", None)
        else:
            os.environ["PYTHONASYNCIODEBUG"] = before
        if handler.records:
            shown = "\n".join(logging.Formatter().format(r) for r in handler.records[:5])
            raise AssertionError(f"asyncio reported {len(handler.records)} unhandled errors:\n{shown}")
    return result
