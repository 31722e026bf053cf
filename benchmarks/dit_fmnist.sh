#!/usr/bin/env bash
# Fashion-MNIST: DiT (router all) vs MoH-DiT-90 vs MoH-DiT-75, tiny presets, equal steps and batch,
# seeds 0 and 1 (or the given ones). Per seed the three runs train at once (one thread each, so they
# see the same machine load); while the next seed trains, each finished run gets: domain FID of 500
# DDIM-25 samples (cfg 1.5, EMA weights) against the 10k test images with the Fashion-MNIST classifier
# features, sampling throughput per backend, sample grids (cfg 4) and, for MoH runs, routing pictures.
# CPU seconds of each command go to <run>.<what>.time (user sys wall).
# Usage: bash benchmarks/dit_fmnist.sh [SEEDS...]   (moh on PATH, e.g. . .venv/bin/activate; needs:
# moh data fetch fashion-mnist --root data)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${*:-0 1}
OUT=${OUT:-runs/dit-fmnist}
FID_ARGS=${FID_ARGS:---num-samples 500 --cfg-scale 1.5 --steps 25}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
timed() { /usr/bin/time -f "%U %S %e" -o "$1" "${@:2}"; }

# the FID feature classifier (fixed recipe, sha256 printed with every number), trained once if missing
python - <<'PY'
import logging, types
logging.basicConfig(level=logging.INFO)
from moh.eval.fid import classifier_extractor
from moh.train.config import RunConfig
print(classifier_extractor(RunConfig.load("configs/dit-fmnist-tiny-mha.yaml"), types.SimpleNamespace()).label)
PY

evaluate() {
  timed "$OUT/$1.eval.time" moh eval "$OUT/$1" $FID_ARGS --throughput-backends sparse,masked \
    --throughput-images 16 > "$OUT/$1.eval.log" 2>&1
  timed "$OUT/$1.sample.time" moh sample "$OUT/$1" --classes all --per-class 8 --cfg-scale 4 --steps 50 \
    > "$OUT/$1.sample.log" 2>&1
  case "$1" in moh*) moh analyze "$OUT/$1" --out "$OUT/$1/analysis" > "$OUT/$1.analyze.log" 2>&1 ;; esac
}

for s in $seeds; do
  pids=()
  for m in mha moh90 moh75; do
    timed "$OUT/$m-s$s.train.time" moh train "configs/dit-fmnist-tiny-$m.yaml" --set train.seed="$s" \
      --set train.out_dir="$OUT/$m-s$s" > "$OUT/$m-s$s.train.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  for m in mha moh90 moh75; do
    [ -f "$OUT/$m-s$s/final.json" ] || { echo "training $m seed $s failed: see $OUT/$m-s$s.train.log" >&2; exit 1; }
    evaluate "$m-s$s" &
  done
done
wait

python - "$OUT" $seeds <<'PY'
import json, statistics as st, sys
out, seeds = sys.argv[1], sys.argv[2:]
for m in ("mha", "moh90", "moh75"):
    fids, cpu = [], []
    for s in seeds:
        r = json.load(open(f"{out}/{m}-s{s}/eval_fid_classifier.json"))
        fids.append(r["fid"])
        user, sys_, wall = map(float, open(f"{out}/{m}-s{s}.train.time").read().split()[-3:])
        cpu.append(user + sys_)
    sd = st.stdev(fids) if len(fids) > 1 else 0.0
    print(f"{m:6s} domain FID {st.mean(fids):.2f} +- {sd:.2f} (" + " / ".join(f"{f:.2f}" for f in fids)
          + f")  train CPU s {st.mean(cpu):.0f}  extractor sha256 {r['extractor_sha256']}")
PY
