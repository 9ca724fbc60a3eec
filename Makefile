# One entry point for a newcomer: `make demo` and `make test` each set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=  # e.g. make demo DEMO_ARGS=--retrain

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/condiff demo $(DEMO_ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/condiff bench sampler-overhead
	$(BIN)/condiff bench vs-diffusers

clean:
	rm -rf $(VENV) runs .pytest_cache
