# The front door. `make demo` runs the product end to end; `make test` passes the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Locked install (requirements/lock-$(TORCH).txt, every package pinned with hashes; `make lock`
# regenerates both). TORCH=cpu: the CPU wheel from TORCH_CPU_WHEELS; GPU hosts: TORCH=cuda.
TORCH ?= cpu
TORCH_VERSION := 2.13.0
TORCH_CPU_WHEELS ?= /opt/wheels
LOCK := requirements/lock-$(TORCH).txt
UV_VERSION := 0.13.9
ifeq ($(filter $(TORCH),cpu cuda),)
$(error TORCH=$(TORCH): use TORCH=cpu (default) or TORCH=cuda)
endif
# The suite's 25 slowest tests are listed at the end of `make test`, so CI shows where its time goes.
PYTEST_ARGS ?= --durations=25
# `make test` runs the suite in TEST_PROCS pytest processes (pytest-xdist), each test file whole in
# one of them, each process with its own services (tests/conftest.py): the tests mostly wait on
# servers and Ray: 2 processes on 2 cores took 11.8-15.0 min, one process 15.1-16.7 min.
# TEST_PROCS=1: one process.
TEST_PROCS ?= 2

.PHONY: install test test-fast lint up down status demo bench bench-quality bench-ingest bench-jpeg bench-scale-e2e bench-readme bench-peers bench-peers-venv bench-peers-lock gpu-check gpu-device clean help

help:
	@echo "make demo   - install, start the local stack, ingest Fashion-MNIST, train (2 workers), sample"
	@echo "make test   - install and run the full test suite (real S3, MLflow, Ray, Prometheus)"
	@echo "make test-fast - the tests that need no server (about a minute)"
	@echo "make lint   - ruff check + ruff format --check (CI runs it)"
	@echo "make install [TORCH=cuda] - the locked venv (requirements/lock-cpu.txt, or -cuda on GPU hosts)"
	@echo "make lock   - regenerate requirements/lock-{cpu,cuda}.txt from pyproject.toml"
	@echo "make up / make down / make status - the local stack"
	@echo "make bench  - benchmarks; results in bench/results.json and README"
	@echo "make bench-peers - the data path beside LitData and MosaicML Streaming (own venv), ~23 min on 2 loaded cores"
	@echo "make bench-readme - the README's numbers from 3 runs each (bench, demo, ingest), ~35 min"
	@echo "make bench-quality - the model-quality table (issue 17's protocol), resumable, ~2.5 h on 2 cores"
	@echo "make bench-jpeg - JPEG decode, Pillow vs simplejpeg (data.jpeg_decoder), ~2 min"
	@echo "make bench-ingest - 1M images ingested, killed midway and re-run"
	@echo "make bench-scale-e2e [SCALE_IMAGES=N] - 64x64 end to end (S3, 2 Ray workers, one epoch): RSS, data wait"
	@echo "make gpu-check - the GPU path end to end (<= 8 min on one GPU; on CPU, CUDA-only checks skipped)"
	@echo "make gpu-device - the CUDA path and the sizing table with torch alone (no Ray/MLflow/S3), ~3 min on one GPU"

install: $(VENV)/.installed

# The stamp holds the TORCH it was made for: switching cpu <-> cuda reinstalls.
ifneq ($(shell cat $(VENV)/.installed 2>/dev/null),$(TORCH))
$(VENV)/.installed: FORCE
endif
$(VENV)/.installed: pyproject.toml $(LOCK) infra/local/fetch_debs.sh infra/local/check_install.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# pip counts an installed 2.13.0+cpu as torch==2.13.0: drop torch when the build changes.
	if [ -f $@ ] && [ "$$(cat $@)" != $(TORCH) ]; then $(BIN)/python -m pip uninstall -q -y torch; fi
	$(BIN)/python -m pip install -q --require-hashes --no-deps \
		$(if $(filter cpu,$(TORCH)),--find-links $(TORCH_CPU_WHEELS)) -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	$(BIN)/python infra/local/check_install.py $(TORCH) $(LOCK)
	bash infra/local/fetch_debs.sh .cache/debs
	echo $(TORCH) > $@

FORCE:

# Regenerate both locks from pyproject.toml (CPython 3.11, Linux x86_64) with uv; needs PyPI, and
# for the CPU lock the torch $(TORCH_VERSION)+cpu wheel in TORCH_CPU_WHEELS (a folder or an index page).
UV := .cache/uv/bin/uv
UV_COMPILE := $(UV) pip compile pyproject.toml - --extra dev --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --generate-hashes --custom-compile-command 'make lock' -q

.PHONY: lock
lock:
	test -x $(UV) || { $(PYTHON) -m venv .cache/uv && .cache/uv/bin/python -m pip install -q uv==$(UV_VERSION); }
	mkdir -p requirements
	printf 'torch==$(TORCH_VERSION)+cpu\npip\n' | $(UV_COMPILE) --find-links $(TORCH_CPU_WHEELS) -o requirements/lock-cpu.txt
	printf 'torch==$(TORCH_VERSION)\npip\n' | $(UV_COMPILE) -o requirements/lock-cuda.txt

test: install
	$(BIN)/python -m pytest $(if $(filter-out 1,$(TEST_PROCS)),-n $(TEST_PROCS) --dist loadfile) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not services and not slow" $(PYTEST_ARGS)

# One linter and formatter (ruff, configured in pyproject.toml); CI runs it before the tests.
lint: install
	$(BIN)/ruff check pipeline tests bench infra
	$(BIN)/ruff format --check pipeline tests bench infra

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

# 1-worker train with EMA + bf16, SIGKILL and resume, eval and gallery on the device; its own
# S3, MLflow and Ray head on 127.0.0.1. One PASS/FAIL line per check; CI runs it on CPU.
gpu-check: install
	$(BIN)/python -m bench.gpu_check

gpu-device: install
	$(BIN)/python -m bench.gpu_device

bench-readme: install
	$(BIN)/python -m bench.repeat

# data.jpeg_decoder: pillow vs simplejpeg, per image and through the loader; bench/jpeg_decode.md
bench-jpeg: install
	$(BIN)/python -m bench.jpeg_decode --out bench

# Ingest at scale: 1M synthetic images, killed midway and re-run (issue 16); bench/ingest_scale.json
bench-ingest: install
	$(BIN)/python -m bench.ingest_scale

# End to end at 64x64 (issue 16): SCALE_IMAGES structured RGB JPEGs ingested to a private S3,
# one epoch of the "64" preset on 2 Ray Train workers streaming from it, every worker's RSS
# and rank 0's data wait; bench/scale_e2e.json. With bf16 autocast (the default --precision) the
# preset trains at ~34 img/s on 2 CPUs with AVX512-BF16: 200,000 images in ~100 min.
SCALE_IMAGES ?= 200000
bench-scale-e2e: install
	$(BIN)/python -m bench.scale_e2e --images $(SCALE_IMAGES) --out bench

# The model-quality table under issue 17's protocol: the variants the goals name side by side
# (QUALITY_VARIANTS; laplace and gaussian are the other two), QUALITY_MINUTES CPU-min each
# (selection on a validation split included), then the test split once per number (conv
# IWAE-5000 on 2,000 images, MLP on all 10,000). At 30 on 2 quiet cores: ~50 min of training,
# then ~100 min of test evaluation (~200 CPU-min, most of it the conv's 10M decoder passes).
# Resumable: run it again to continue; delete bench/quality/models to start over.
QUALITY_MINUTES ?= 30
QUALITY_VARIANTS ?= bernoulli_mlp,bernoulli,discretized_logistic
bench-quality: install
	$(BIN)/python -m bench.run --only quality --quality-minutes $(QUALITY_MINUTES) \
		--quality-variants $(QUALITY_VARIANTS) --iwae-images 2000 --out-dir bench/quality --readme

# The data path beside LitData and MosaicML Streaming on the same images (issue 16): a bench-only
# extra in its own venv (.venv-peers), so the peers can never replace the project's torch; torch
# stays $(TORCH_VERSION)+cpu by constraints and is checked after the install. bench/peers.md.
PEERS_VENV := .venv-peers
PEERS_PYTHON ?= python3.11
PEERS_LOCK := requirements/bench-peers.txt
PEERS_PIN := requirements/bench-peers-constraints.txt
PEERS_PIP = --find-links $(TORCH_CPU_WHEELS) -c $(PEERS_PIN)

bench-peers: install bench-peers-venv
	$(BIN)/python -m bench.peers

bench-peers-venv: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: $(PEERS_LOCK) $(PEERS_PIN)
	test -x $(PEERS_VENV)/bin/python || $(PEERS_PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps $(PEERS_PIP) -r $(PEERS_LOCK)
	$(PEERS_VENV)/bin/python -m bench.peers_runner --check torch==$(TORCH_VERSION)+cpu
	touch $@

# Re-resolve requirements/bench-peers.in into the lock (needs PyPI). PyPI's torchvision is a CUDA
# build that cannot load beside the CPU torch (`operator torchvision::nms does not exist`): it is
# left out, and bench/peers_runner.py stubs the two names mosaicml-streaming imports from it.
bench-peers-lock:
	rm -rf .cache/peers-lock
	$(PEERS_PYTHON) -m venv .cache/peers-lock
	.cache/peers-lock/bin/python -m pip install -q $(PEERS_PIP) torch==$(TORCH_VERSION)+cpu
	.cache/peers-lock/bin/python -m pip install -q $(PEERS_PIP) -r requirements/bench-peers.in
	.cache/peers-lock/bin/python -m pip uninstall -q -y torchvision
	{ echo "# make bench-peers-lock: requirements/bench-peers.in resolved under $(PEERS_PIN)"; \
	  echo "# (Python 3.11, Linux x86_64); torchvision deliberately absent, see the Makefile."; \
	  .cache/peers-lock/bin/python -m pip freeze; } > $(PEERS_LOCK)

clean: down
	rm -rf .stack .data
