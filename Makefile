# llmsuite developer entry points. Everything runs from a local virtualenv
# (.venv) created by `make setup`; no global installs.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= models/tiny
EMBED_MODEL ?= models/tiny-embed
# onnxruntime and onnxruntime-gpu install the same module and must never be
# installed together: pick exactly one extra, by whether a GPU answers.
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
PYTEST_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=
BREAKING_AGAINST ?= .git\#branch=main

.DEFAULT_GOAL := help
.PHONY: help setup proto proto-check lint format test fuzz bench bench-http bench-engine soak model run stubs breaking lock clean

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Every distribution in the tree, editable (src layouts: a plain path entry per
# folder, so tools and IDEs see the same tree Python imports), in one resolve so
# the llmsuite-* requirements are satisfied by these folders, never by an index.
DISTRIBUTIONS := clients/python services/runtime services/tokenizer services/inference \
                 services/gateway services/builder services/suite
PYPROJECTS    := $(addsuffix /pyproject.toml,$(DISTRIBUTIONS))

$(VENV)/.installed-$(EXTRA): $(PYPROJECTS) requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(foreach d,$(DISTRIBUTIONS),-e $(d)) \
		-e 'services/inference[$(EXTRA)]' -e 'services/builder[int4]' -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(VENV)/.installed-$(EXTRA) ## create .venv and install every distribution (inference with the cpu or gpu extra) + dev tools

proto: setup ## regenerate Python stubs (+ .pyi) from protos/
	$(BIN)/python protos/generate.py

proto-check: setup ## fail if committed stubs differ from protos/
	$(BIN)/python protos/generate.py --check

lint: setup ## ruff + mypy --strict (pyproject.toml) + buf lint + stub freshness
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/python protos/generate.py --check

format: setup ## apply ruff fixes
	$(BIN)/ruff check --fix .

test: setup ## run the whole test suite (real servers on loopback)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

FUZZ_EXAMPLES ?= 500
fuzz: setup ## fault and fuzz suite (tests/fuzz) with FUZZ_EXAMPLES examples per test; codes per RPC in build/fuzz-report.json
	@mkdir -p build
	LLMSUITE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) LLMSUITE_FUZZ_REPORT=build/fuzz-report.json \
		$(BIN)/python -m pytest tests/fuzz -o timeout=0 $(PYTEST_ARGS)

$(MODEL)/model.onnx: | setup
	$(BIN)/llmsuite-build-model --preset tiny --out $(MODEL)

$(EMBED_MODEL)/model.onnx: | setup
	$(BIN)/llmsuite-build-model --kind encoder --preset tiny --out $(EMBED_MODEL)

model: $(MODEL)/model.onnx $(EMBED_MODEL)/model.onnx ## build the default tiny models (decoder and encoder; offline, deterministic)

PORT_BASE ?=
RUN_ARGS  ?=
run: setup model ## start tokenizer, inference, gateway and the HTTP API locally (PORT_BASE=N: ports N..N+3; RUN_ARGS: launcher options, see its --help); Ctrl-C stops them
	$(BIN)/python -m llmsuite.cluster --model tiny=$(MODEL) --embedding-model tiny-embed=$(EMBED_MODEL) $(if $(PORT_BASE),--port-base $(PORT_BASE)) $(RUN_ARGS)

# Benchmark-only tools, each in a virtualenv of its own under build/bench-tools, so that
# neither they nor the onnxruntime build onnxruntime-genai brings touch the services' .venv.
BENCH_TOOLS := build/bench-tools
$(BENCH_TOOLS)/%/.installed: bench/requirements/%.txt
	rm -rf $(BENCH_TOOLS)/$*
	$(PYTHON) -m venv $(BENCH_TOOLS)/$*
	$(BENCH_TOOLS)/$*/bin/python -m pip install --quiet -r $<
	touch $@

bench: setup $(BENCH_TOOLS)/ortgenai/.installed ## serving benchmark vs in-process ONNX Runtime and onnxruntime-genai, bench preset in each layout; writes docs/performance.md (knobs: BENCH_ARGS)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

BENCH_HTTP_ARGS ?=
bench-http: setup $(BENCH_TOOLS)/guidellm/.installed $(BENCH_TOOLS)/aiperf/.installed ## guidellm and aiperf with their defaults against llmsuite-openai; fails on any errored request (knobs: BENCH_HTTP_ARGS)
	$(BIN)/python bench/ecosystem.py $(BENCH_HTTP_ARGS)

bench-engine: setup ## engine microbenchmarks: prefill/decode tokens/s, what the KV cache buys
	$(BIN)/python bench/bench_engine.py

soak: setup ## memory soak: 64 streams for 10 min on the tiny and bench presets; peak RSS and drift against the KV budget, PASS/FAIL (knobs: SOAK_ARGS)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# Container image locks (docker/requirements/*.txt, read by docker/Dockerfile):
# every third-party package an image installs, pinned with hashes, resolved for
# the images' Python and platform. Existing pins are kept unless
# LOCK_ARGS=--upgrade; our own distributions are built from the checkout, so
# they stay out of the locks.
LOCKS             := build builder tokenizer inference-cpu inference-gpu gateway
LOCK_PLATFORM     ?= x86_64-manylinux_2_28
LOCK_ARGS         ?=
OWN_DISTRIBUTIONS := llmsuite-client llmsuite-runtime llmsuite-tokenizer llmsuite-inference \
                     llmsuite-gateway llmsuite-builder llmsuite

lock: setup ## pin the images' dependencies with hashes (docker/requirements/*.txt; LOCK_ARGS=--upgrade refreshes)
	@for lock in $(LOCKS); do \
		echo "locking docker/requirements/$$lock.txt"; \
		$(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 --python-platform $(LOCK_PLATFORM) \
			$(addprefix --no-emit-package ,$(OWN_DISTRIBUTIONS)) --custom-compile-command 'make lock' \
			$(LOCK_ARGS) --output-file docker/requirements/$$lock.txt docker/requirements/$$lock.in || exit 1; \
	done

clients/node/node_modules/.package-lock.json: clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund

stubs: setup clients/node/node_modules/.package-lock.json ## client stubs for Go and TypeScript via buf generate (see docs/clients.md)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/buf generate

breaking: setup ## buf breaking against main
	$(BIN)/buf breaking --against '$(BREAKING_AGAINST)'

clean: ## remove the venv, built models and caches
	rm -rf $(VENV) models build *.egg-info .pytest_cache .ruff_cache gen
