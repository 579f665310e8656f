#!/usr/bin/env bash
# Runs every benchmark and appends the results to benchmarks/results.md (machine named there).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-peers.sh >/dev/null
.venv/bin/python benchmarks/record_fetch.py "$@"
