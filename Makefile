# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install kernels demo test test-fast lint format proto clean

# A new top-level package needs a reinstall too: the editable install maps packages by name.
$(STAMP): pyproject.toml $(wildcard shared/*/__init__.py services/*/__init__.py)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pin torch first: an unpinned resolve pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# The CPU decode-step kernels (attention, linears), built once (then found in torch's
# extension cache) before anything times an engine's start; without a C++ compiler it
# warns and the model keeps torch's kernels.
kernels: $(STAMP)
	$(BIN)/python -c "from llm.core import cpu_kernels; cpu_kernels.enable()"

demo: kernels
	$(BIN)/python deploy/local/demo.py

test: kernels
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: kernels
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate the engine's gRPC stubs (tests/unit/test_proto_stubs.py fails when they are stale).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Illm_common/proto/v1=proto/llm/engine/v1 \
		--python_out=services --grpc_python_out=services --pyi_out=services \
		proto/llm/engine/v1/engine.proto

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
