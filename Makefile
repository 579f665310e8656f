PY ?= python3
VENV := .venv

.PHONY: demo test lint bench

# The product alone: what `chartsight` needs to answer questions (no compilers, no test peers).
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

# The product with its development tools and the test peers' Python parts (llama.cpp's server is
# compiled from source once: ~6 min on 2 cores).
$(VENV)/.installed-dev: $(VENV)/.installed
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
	./benchmarks/run.sh
