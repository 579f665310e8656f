#!/usr/bin/env bash
# Runs every benchmark and appends the results to benchmarks/results.md (machine named there).
#   benchmarks/run.sh            all of them (the index benchmark needs ~22 GiB RAM and ~15 min at 1M)
#   benchmarks/run.sh --quick    smaller sizes, for a check that they run
# On a GPU machine, add --gpu: FAISS on the GPU and the ViT tower in fp16 are timed too.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
PY=.venv/bin/python
quick=0; gpu=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --gpu) gpu=(--gpu) ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
./scripts/setup-peers.sh >/dev/null
if [ "$quick" = 1 ]; then
  $PY benchmarks/record_fetch.py --runs 3 --rtt-ms 0 20
  $PY benchmarks/index_search.py --sizes 10000 100000 --dims 512 "${gpu[@]}"
else
  $PY benchmarks/record_fetch.py
  $PY benchmarks/index_search.py "${gpu[@]}"
fi
if [ "$quick" = 1 ]; then
  $PY benchmarks/large_chart.py --sizes 10000 --cold-runs 3 --rounds 2
else
  $PY benchmarks/large_chart.py
fi
if [ "$quick" = 1 ]; then
  $PY benchmarks/serve_load.py --seconds 20 --warmup 5
  $PY benchmarks/bulk_ingest.py --patients 60
  $PY benchmarks/index_build.py --patients 120 --queries 20
else
  $PY benchmarks/serve_load.py          # dba6530 and the current code side by side
  $PY benchmarks/bulk_ingest.py --patients 2000
  $PY benchmarks/index_build.py --patients 2000   # 100000 for the population figure (hours)
  $PY benchmarks/soak.py --minutes 30 --append
fi
$PY benchmarks/encoders.py
$PY benchmarks/eval_retrieval.py
$PY benchmarks/eval_agent.py
$PY benchmarks/eval_suites.py
