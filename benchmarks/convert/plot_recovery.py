"""Recovery curves: validation perplexity (the runs' eval set: 4 x 2 x 512 validation tokens) vs
tuning tokens, step 0 from eval_all.py's engine_eval_loss of the start model.

    python benchmarks/convert/plot_recovery.py --start runs/convert/eval_untuned.jsonl \
        --run "calibrated 7/9=runs/convert/tune-cal75-lora:runs/convert/smollm2-cal75" ... \
        --original .cache/smollm2-135m --tokens-per-step 1024 --out docs/results/convert_recovery.png
"""
import argparse, json, math
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

ap = argparse.ArgumentParser()
ap.add_argument("--start", nargs="+", required=True, help="eval_all.py JSON lines (step-0 values)")
ap.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR:START_MODEL")
ap.add_argument("--original", required=True, help="the model whose level is the target (its eval_all line)")
ap.add_argument("--tokens-per-step", type=int, default=1024)
ap.add_argument("--out", required=True)
a = ap.parse_args()
start = {}
for f in a.start:
    for line in open(f):
        if line.strip().startswith("{"):
            r = json.loads(line)
            if "engine_eval_loss" in r:
                start[r["model"]] = r["engine_eval_loss"]
fig, ax = plt.subplots(figsize=(6.4, 4.2))
target = math.exp(start[a.original])
ax.axhline(target, color="k", lw=1, label=f"original SmolLM2-135M ({target:.1f})")
ax.axhline(target * 1.05, color="k", lw=1, ls=":", label="original + 5%")
for spec in a.run:
    label, rest = spec.split("=", 1)
    run, model = rest.rsplit(":", 1)
    xs, ys = [0], [math.exp(start[model])]
    for line in open(f"{run}/eval.jsonl"):
        r = json.loads(line)
        xs.append(r["step"] * a.tokens_per_step)
        ys.append(math.exp(r["loss"]))
    ax.plot([x / 1000 for x in xs], ys, marker="o", label=label)
ax.set_xlabel("tuning tokens (thousands)")
ax.set_ylabel("validation perplexity (4k tokens)")
ax.set_yscale("log")
fmt = matplotlib.ticker.FormatStrFormatter("%g")  # plain numbers, not 2.1 x 10^1
ax.yaxis.set_major_formatter(fmt)
ax.yaxis.set_minor_formatter(fmt)
ax.set_title("SmolLM2-135M -> MoH at 7 of 9 heads: recovery with LoRA")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")
fig.tight_layout()
fig.savefig(a.out, dpi=120)
print(a.out)
