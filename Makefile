# thoughtform: `make serve` starts the workbench, `make test` runs lint and the whole suite.
# Both set up .venv from nothing (pip, plus Debian's chromium for the browser tests).

VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
# Exact versions `make test` passed with (refresh: `make constraints`), so a fresh machine
# installs what was tested here, not whatever is newest that day. Both `make serve` and
# `make test` install through $(STAMP), so both get them.
PINS    := -c constraints.txt --build-constraint build-constraints.txt
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# llama-cpp-python compiles llama.cpp from source. A portable AVX2 build: -march=native enables
# AMX kernels that crash (SIGSEGV in batch decode) in sandboxes that do not grant AMX state.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: test serve lint typecheck chromium adapter vectors screenshots bench clean constraints

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt --upgrade pip

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# setup.py builds the one compiled part (backends/_scan.c) into the source tree.
$(STAMP): pyproject.toml setup.py src/thoughtform/backends/_scan.c constraints.txt build-constraints.txt | $(PY)
	$(PIP) install $(PINS) 'torch==2.13.0'
	$(PIP) install $(PINS) -e '.[dev,llama,ui,hf,train]'
	touch $@

# Pin what is installed now (after a dependency change in pyproject.toml and a green `make test`).
constraints: $(STAMP)
	$(PY) scripts/freeze_constraints.py

chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) chromium lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider

serve: $(STAMP)
	$(VENV)/bin/thoughtform serve

bench: $(STAMP)
	$(VENV)/bin/thoughtform bench parse
	$(VENV)/bin/thoughtform bench backend

screenshots: $(STAMP) chromium
	$(PY) scripts/screenshots.py

# Rebuild the shipped voices adapter from nothing with a fixed seed: synth -> train -> export.
adapter: $(STAMP)
	scripts/build_adapter.sh

# Rebuild the shipped seed voice vectors from nothing with fixed seeds: synth -> vectors train.
vectors: $(STAMP)
	scripts/build_vectors.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build
	find src -name '*.so' -delete
