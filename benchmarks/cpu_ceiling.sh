#!/usr/bin/env bash
# The CPU ceiling of issue 11, section 2: `sparse` against the `ideal` rows of `moh bench`.
#
#   benchmarks/cpu_ceiling.sh [1t|2t|table|all]    (default: all = 1t, 2t, table)
#
# 1t: one torch thread, CPU clock (CPU time of the bench process: robust to other jobs)
# 2t: two torch threads, wall clock (meaningful only on a quiet machine: the load average at the
#     start and the end of each run is logged next to the JSON)
# Cases: D=768, 12 heads of 64, batch 1; forward N=2048 and 4096, causal and bidirectional;
# decode at 1k and 4k caches (4 layers, time per layer); training step (forward + backward) at
# N=2048 and 4096, causal and bidirectional; 50% and 75% heads (100% is always added: ratio (b)).
# `moh bench` takes one training length per call, so N=4096 training is a second call.
# Writes results/cpu-ceiling/*.json (gitignored) and results/cpu-ceiling/table.md.
#
# Environment: REPEATS (default 5), WARMUP (default 1), OUT (default results/cpu-ceiling),
# MOH (default .venv/bin/moh), PY (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-1}
OUT=${OUT:-results/cpu-ceiling}
MOH=${MOH:-.venv/bin/moh}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
COMMON=(--backends sparse --ratios 50,75 --dim 768 --heads 12 --head-dim 64 --batch-size 1
        --repeats "$REPEATS" --warmup "$WARMUP")

bench() {  # bench NAME ARGS...: one moh bench call, logged with the load before and after
  local name=$1; shift
  local log="$OUT/$name.log"
  {
    echo "# $(date -u +%FT%TZ) start | $(uptime)"
    echo "# $MOH bench ${COMMON[*]} $* --out $OUT/$name.json"
  } | tee "$log"
  local t0=$SECONDS
  "$MOH" bench "${COMMON[@]}" "$@" --out "$OUT/$name.json" 2>&1 | tee -a "$log"
  echo "# $(date -u +%FT%TZ) end after $((SECONDS - t0)) s | $(uptime)" | tee -a "$log"
}

run_threads() {  # run_threads TAG ARGS...: the main cases, then the N=4096 training step
  local tag=$1; shift
  bench "$tag-main" --seq-lens 2048,4096 --decode-contexts 1024,4096 --train-seq-len 2048 "$@"
  bench "$tag-train4096" --seq-lens '' --decode-contexts '' --train-seq-len 4096 "$@"
}

case "$PART" in
  1t) run_threads 1t --threads 1 --clock cpu ;;
  2t) run_threads 2t --threads 2 --clock wall ;;
  table) ;;
  all) run_threads 1t --threads 1 --clock cpu; run_threads 2t --threads 2 --clock wall ;;
  *) echo "usage: $0 [1t|2t|table|all]" >&2; exit 2 ;;
esac

"$PY" benchmarks/cpu_ceiling_table.py "$OUT" | tee "$OUT/table.md"
