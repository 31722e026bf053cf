#!/usr/bin/env bash
# The from-scratch English comparison of docs/results/llm.md: MHA vs MoH-75 vs MoH-50 (llm-mini-*),
# seeds 1 and 2, same data, steps and tokens: the six runs side by side, one thread each (on a busy
# shared machine six single-thread processes finish sooner than any sequence), then moh eval of
# each on the whole validation split. Then:
#   python benchmarks/llm_report.py runs/lm
#   bash benchmarks/llm_scratch.sh [TOKENS_DIR] [OUT_ROOT] [extra --set ...]
set -euo pipefail
TOKENS=${1:-data/english/tokens}
OUT=${2:-runs/lm}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$OUT"
for v in mha moh75 moh50; do
  for seed in 1 2; do
    OMP_NUM_THREADS=1 moh train "configs/llm-mini-$v.yaml" --set train.seed=$seed \
      --set "data.args.root=$TOKENS" --set "train.out_dir=$OUT/llm-mini-$v-s$seed" --set train.progress=false "$@" \
      > "$OUT/llm-mini-$v-s$seed.log" 2>&1 &
  done
done
wait
# the whole validation split (the runs' own last evaluation covers train.eval_batches batches)
for d in "$OUT"/llm-mini-*-s?; do
  OMP_NUM_THREADS=1 moh eval "$d" --lm-batch-size 16 --out "$d/eval_validation_full.json" > "$d.eval.log" 2>&1 &
done
wait
