#!/usr/bin/env bash
# Fashion-MNIST: MHA, MoH-75 and MoH-50 tiny ViTs x seeds 1..3, two one-thread runs at a time
# (faster than one two-thread run on a 2-core machine). Then prints top-1 mean +- std per model.
# Usage: bash benchmarks/fmnist_seeds.sh [SEEDS...]   (needs: moh data fetch fashion-mnist --root data)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${*:-1 2 3}
jobs=()
for s in $seeds; do for m in mha moh75 moh50; do jobs+=("$m $s"); done; done
printf '%s\n' "${jobs[@]}" | OMP_NUM_THREADS=1 xargs -P 2 -L 1 sh -c \
  'moh train configs/fmnist-vit-tiny-$0.yaml --set train.seed=$1 --set train.out_dir=runs/fmnist-$0-s$1 > runs/fmnist-$0-s$1.log 2>&1'
python - $seeds <<'PY'
import json, statistics as st, sys
seeds = sys.argv[1:]
for m in ("mha", "moh75", "moh50"):
    accs = [100 * json.load(open(f"runs/fmnist-{m}-s{s}/final.json"))["acc"] for s in seeds]
    sd = st.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{m:6s} top-1 {st.mean(accs):.2f} +- {sd:.2f}  seeds: " + " / ".join(f"{a:.2f}" for a in accs))
PY
