PY ?= python3
VENV := .venv

.PHONY: demo test lint bench

# One virtual environment with the product and its development tools.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

# Main job on the embedded default: demo patients and the case index, three questions answered.
demo: $(VENV)/.installed
	$(VENV)/bin/chartsight demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Whole test suite: installs and starts the real peer servers it talks to.
test: $(VENV)/.installed lint
	./scripts/setup-peers.sh
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

bench: $(VENV)/.installed
	./benchmarks/run.sh
