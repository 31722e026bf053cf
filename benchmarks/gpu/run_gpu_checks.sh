#!/usr/bin/env bash
# One command for a session that has the GPU machine (H200, torch 2.11, triton 3.6, no network):
#   bash benchmarks/gpu/run_gpu_checks.sh [--quick]     (results in $OUT, else ./gpu_out)
# 1. the Triton kernel tests, compiled on CUDA (tests/backends/test_triton_kernels.py);
# 2. benchmarks/gpu/bench_kernels.py: rows attention fwd / fwd+bwd at N=4096 and 8192, decode at a
#    32k cache (batch 16) vs SDPA flash on all heads, the projections, a small tuning sweep -> JSON;
# 3. `moh bench --device cuda --dtype bf16` at the issue's sizes (D=2048, 16 heads of 128):
#    forward causal/bidirectional at N=4096 and 8192 and the training step at 8192, then decode at a
#    32k cache with batch 16: sparse vs SDPA vs ideal at 50% heads -> bench_cuda_*.json.
# Expected 5-8 minutes, most of it Triton compilation; at most ~10 (each step has a timeout, and the
# JSON is rewritten after every benchmark section, so a timeout keeps what was measured).
# SKIP_TESTS=1 runs the benchmarks alone; PYTHON=... picks the interpreter (default python3).
# Checked here only on CPU: `python benchmarks/gpu/bench_kernels.py --smoke` (tiny, interpreter).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# no install needed: `pip install -e .` would need the network for its build dependencies
# (offline: pip install --no-deps --no-build-isolation -e .)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

say "env"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  say "kernel tests on CUDA (timeout 180 s)"
  timeout 180 "$PY" -m pytest tests/backends/test_triton_kernels.py -q -p no:cacheprovider --durations=5 \
    > "$OUT/tests.log" 2>&1
  rc=$?
  tail -n 30 "$OUT/tests.log"
  echo "tests rc=$rc (0 = all passed, 124 = timeout)" | tee -a "$OUT/tests.log"
fi

say "benchmarks (timeout 240 s; sections starting after 170 s are skipped)"
timeout 240 "$PY" benchmarks/gpu/bench_kernels.py --out "$OUT" --budget-s 170 "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 60
echo "bench rc=${PIPESTATUS[0]} (124 = timeout; partial JSON kept)"
say "moh bench --device cuda --dtype bf16 (timeouts 150 s + 90 s)"
BENCH=(-m moh.cli bench --device cuda --dtype bf16 --dim 2048 --heads 16 --head-dim 128 --ratios 50,100
       --backends sparse --repeats 10 --warmup 3)
timeout 150 "$PY" "${BENCH[@]}" --seq-lens 4096,8192 --train-seq-len 8192 --decode-contexts '' \
  --out "$OUT/bench_cuda_forward_train.json" 2>&1 | tee "$OUT/bench_cuda_forward_train.log" | tail -n 20
timeout 90 "$PY" "${BENCH[@]}" --seq-lens '' --train-seq-len 0 --decode-contexts 32768 --batch 16 --decode-layers 2 \
  --out "$OUT/bench_cuda_decode.json" 2>&1 | tee "$OUT/bench_cuda_decode.log" | tail -n 12
say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
