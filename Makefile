# The only set-up a newcomer needs: `make run` (the main job) and `make test` (the default suite).
# Both create .venv, install system packages, Python packages (torch pinned to the local CPU build)
# and fetch the zoo models into the cache. Everything is idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
MODELS := smollm2-135m-instruct gemma3-270m
WHEELS := $(HOME)/.cache/tandem/wheels
LLAMA_WHEEL := $(WHEELS)/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-slow test-gpu bench lint setup models llamacpp clean

run: setup models
	$(BIN)/python -m scripts.main_job

test: setup models
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo --no-cache
	TANDEM_REQUIRE_MODELS=1 $(BIN)/python -m pytest -q

test-slow: setup models llamacpp
	TANDEM_REQUIRE_MODELS=1 $(BIN)/python -m pytest -q -m slow

# On a GPU machine: its own python3 with a CUDA torch (the venv's torch is the pinned CPU build).
test-gpu:
	python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_graph.py tests/test_engines.py tests/test_agent_engines.py

bench: setup models llamacpp
	$(BIN)/python benchmarks/edge_decode.py --write-docs
	$(BIN)/python benchmarks/hub_load.py --pin-hub --write-docs

# ruff, then the layering contracts of pyproject.toml ([tool.importlinter]; docs/architecture.md)
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-logo --no-cache

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_system.sh
	./scripts/install_system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is a local CPU build here; any other pick pulls GBs of CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[reference,dev,onnx,embeddings,eval]'
	rm -f $(VENV)/.installed-*
	touch $@

models: setup
	$(BIN)/tandem models pull --prepare $(MODELS)

# llama.cpp compiles from source (about 5 minutes on 2 cores, more when busy): build the wheel once, cache it.
llamacpp: setup
	@if [ ! -f $(LLAMA_WHEEL) ]; then \
	  mkdir -p $(WHEELS) && CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip wheel --no-deps -w $(WHEELS) llama-cpp-python==0.3.36; fi
	$(BIN)/python -m pip install -q --no-deps $(LLAMA_WHEEL)
	# llama-cpp-python's own dependencies, and its [server] extra (an upstream for the hub's tests)
	$(BIN)/python -m pip install -q diskcache sse-starlette starlette-context pydantic-settings

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
