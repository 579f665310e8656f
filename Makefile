PY ?= python3
VENV := .venv
LLAMA_CPP_VERSION := 0.3.36

.PHONY: demo test lint bench

# The product alone: what `chartsight` needs to answer questions (no compilers, no test peers).
# Its own modules are byte-compiled as pip does for a wheel's: an editable install leaves that to
# the first import, and where PYTHONDONTWRITEBYTECODE is set, to every run (≈0.2 s of a cold ask).
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	$(VENV)/bin/python -m compileall -q surfaces agent retrieval connectors prompts common
	touch $@

# The product with its development tools and the test peers' Python parts (llama.cpp's server is
# compiled from source: ~6 min on 2 cores).
# llama.cpp is built for a baseline x86-64 CPU, not -march=native: a native build may use
# instructions a virtual machine advertises but traps (AMX, AVX-512: "Illegal instruction"), and
# pip's wheel cache would hand such a build to the next machine; so no cache for it either.
$(VENV)/.installed-dev: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(VENV)/bin/pip install -q --no-cache-dir \
		"llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

# Main job on the embedded default: demo patients and the case index, three questions answered.
demo: $(VENV)/.installed
	$(VENV)/bin/chartsight demo

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Whole test suite: installs and starts the real peer servers it talks to.
test: $(VENV)/.installed-dev lint
	./scripts/setup-peers.sh
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

bench: $(VENV)/.installed-dev
	$(VENV)/bin/pip install -q -e ".[bench]"
	./benchmarks/run.sh
