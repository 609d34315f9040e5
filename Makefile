# The front door. `make demo` runs the product end to end; `make test` passes the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# GPU hosts: make install TORCH_SPEC='torch==2.13.0' (or any CUDA build) before the project.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-fast lint up down status demo bench bench-quality clean help

help:
	@echo "make demo   - install, start the local stack, ingest Fashion-MNIST, train (2 workers), sample"
	@echo "make test   - install and run the full test suite (real S3, MLflow, Ray, Prometheus)"
	@echo "make up / make down / make status - the local stack"
	@echo "make bench  - benchmarks; results in bench/results.json and README"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml infra/local/fetch_debs.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	bash infra/local/fetch_debs.sh .cache/debs
	touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check pipeline tests bench

up: install
	$(BIN)/pipeline stack up

down:
	@if [ -x $(BIN)/pipeline ]; then $(BIN)/pipeline stack down; fi

status: install
	$(BIN)/pipeline stack status

demo: install
	bash infra/local/demo.sh

bench: install
	$(BIN)/python -m bench.run

# The model-quality table (issue 4): 5 variants x 20 CPU-min side by side, ~60 min on 2 cores.
bench-quality: install
	$(BIN)/python -m bench.run --only quality --quality-minutes 20 --iwae-images 200 \
		--out-dir bench/quality

clean: down
	rm -rf .stack .data
