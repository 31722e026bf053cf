"""Summary of the from-scratch comparison (benchmarks/llm_scratch.sh): validation loss per model
(mean +- std over seeds), the gaps to MHA against the goals, a table of parameters, token budget,
perplexity per seed and training wall time, loss curves, sample generations.
The validation loss is the one over the whole validation split that ``moh eval RUN_DIR --out
RUN_DIR/eval_validation_full.json`` wrote (the training run's last evaluation covers only
``train.eval_batches`` batches); without that file, final.json's.

    python benchmarks/llm_report.py runs/lm [--png docs/llm/loss_curves.png] [--json results/llm_scratch.json]
        [--prompts "The king,In the city"] [--new-tokens 40]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

VARIANTS = (("mha", "MHA (100% heads)"), ("moh75", "MoH-75"), ("moh50", "MoH-50"))
GOALS = {"moh75": 0.02, "moh50": 0.05}  # nats above MHA at most


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(root: Path) -> dict:
    """variant -> list of runs {seed, final (final.json), train (metrics), eval (eval records)}."""
    out: dict[str, list[dict]] = {}
    for key, _ in VARIANTS:
        for run in sorted(root.glob(f"llm-mini-{key}-s*")):
            if (run / "final.json").is_file():
                full = run / "eval_validation_full.json"
                final = json.loads((run / "final.json").read_text())
                val = json.loads(full.read_text()) if full.is_file() else final
                out.setdefault(key, []).append({
                    "dir": str(run), "seed": int(run.name.rsplit("-s", 1)[1]), "final": final,
                    "val_loss": val["loss"], "val_tokens": val.get("sequences", val.get("n")),
                    "val_source": full.name if full.is_file() else "final.json",
                    "train": read_jsonl(run / "metrics.jsonl"), "eval": read_jsonl(run / "eval.jsonl")})
    return out


def table(runs: dict) -> tuple[list[dict], str]:
    rows = []
    base = statistics.mean(r["val_loss"] for r in runs["mha"]) if "mha" in runs else None
    for key, label in VARIANTS:
        if key not in runs:
            continue
        losses = [r["val_loss"] for r in runs[key]]
        mean = statistics.mean(losses)
        row = {"variant": key, "label": label, "seeds": [r["seed"] for r in runs[key]], "val_loss": losses,
               "mean": mean, "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
               "heads_active": runs[key][0]["final"]["heads_active"], "val_sequences": runs[key][0]["val_tokens"],
               "val_source": runs[key][0]["val_source"],
               "train_time_s": statistics.mean(r["final"]["train_time_s"] for r in runs[key])}
        if base is not None:
            row["gap"] = mean - base
            if key in GOALS:
                row["goal"] = GOALS[key]
                row["goal_met"] = row["gap"] <= GOALS[key]
        rows.append(row)
    lines = ["| model | heads active | validation loss (mean ± std) | per seed | gap to MHA | goal |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        goal = "" if "goal" not in r else f"≤ +{r['goal']:.2f}: {'met' if r['goal_met'] else 'not met'}"
        gap = "" if "gap" not in r or r["variant"] == "mha" else f"{r['gap']:+.4f}"
        lines.append(f"| {r['label']} | {r['heads_active']:.2f} | {r['mean']:.4f} ± {r['std']:.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in r['val_loss'])} | {gap} | {goal} |")
    return rows, "\n".join(lines)


def run_shape(run_dir: str) -> dict:
    """Parameters (the model its config.json builds; tied weights once) and the token budget
    (config.yaml: steps x batch x grad_accum x seq_len) of one run."""
    import torch
    import yaml

    import moh  # noqa: F401  (registers the Auto classes)
    from moh.hf import MoHForCausalLM, MoHLMConfig

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    train, seq = cfg["train"], cfg["data"]["args"]["seq_len"]
    with torch.device("meta"):
        model = MoHForCausalLM(MoHLMConfig.from_pretrained(run_dir))
    per_step = train["batch_size"] * train.get("grad_accum", 1) * seq
    return {"params": sum(p.numel() for p in model.parameters()), "steps": train["steps"],
            "tokens_per_step": per_step, "tokens": train["steps"] * per_step}


def perplexity_table(runs: dict) -> tuple[list[dict], str]:
    """Model, heads, parameters, steps x tokens, validation perplexity per seed and of the mean
    loss, training wall time per seed (final.json's train_time_s)."""
    import math

    rows = []
    lines = ["| model | heads active | parameters | steps x tokens/step (tokens) | perplexity per seed | "
             "perplexity of mean loss | train wall time per seed |", "|---|---|---|---|---|---|---|"]
    for key, label in VARIANTS:
        if key not in runs:
            continue
        shape = run_shape(runs[key][0]["dir"])
        ppl = [math.exp(r["val_loss"]) for r in runs[key]]
        mean_loss = statistics.mean(r["val_loss"] for r in runs[key])
        wall = [r["final"]["train_time_s"] for r in runs[key]]
        rows.append({"variant": key, **shape, "seeds": [r["seed"] for r in runs[key]], "perplexity": ppl,
                     "perplexity_of_mean_loss": math.exp(mean_loss), "train_wall_s": wall})
        lines.append(f"| {label} | {runs[key][0]['final']['heads_active']:.2f} | {shape['params'] / 1e6:.3f}M | "
                     f"{shape['steps']} x {shape['tokens_per_step']} ({shape['tokens'] / 1e6:.3f}M) | "
                     + ", ".join(f"s{r['seed']} {x:.2f}" for r, x in zip(runs[key], ppl))
                     + f" | {math.exp(mean_loss):.2f} | " + ", ".join(f"{w / 60:.1f} min" for w in wall) + " |")
    return rows, "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"mha": "tab:blue", "moh75": "tab:orange", "moh50": "tab:green"}
    for key, label in VARIANTS:
        for i, run in enumerate(runs.get(key, [])):
            kw = dict(color=colors[key], alpha=0.85, lw=1.2, ls="-" if i == 0 else "--",
                      label=f"{label} seed {run['seed']}")
            ax_t.plot([r["step"] for r in run["train"]], [r["task_loss"] for r in run["train"]], **kw)
            ax_e.plot([r["step"] for r in run["eval"]], [r["loss"] for r in run["eval"]], marker="o", ms=3, **kw)
            last = run["train"][-1]["step"]
            ax_e.plot([last + 8 * (i + 1)], [run["val_loss"]], marker="*", ms=9, color=colors[key], ls="none")
    ax_t.set(xlabel="step", ylabel="training cross-entropy (nats / token)", title="training loss (task term)")
    ax_e.set(xlabel="step", ylabel="validation cross-entropy (nats / token)",
             title="validation loss (lines: 8 batches; stars: whole split)")
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def samples(runs: dict, prompts: list[str], new_tokens: int) -> dict:
    """Greedy continuations of each prompt by each variant's first seed (``moh.hf.run.load_model_dir``)."""
    import torch

    from moh.eval.generate import encode_prompt
    from moh.hf.run import load_model_dir

    out = {}
    for key, label in VARIANTS:
        if key not in runs:
            continue
        model, tok = load_model_dir(runs[key][0]["dir"])
        texts = []
        for prompt in prompts:
            ids = encode_prompt(tok, prompt)
            with torch.inference_mode():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=min(new_tokens, model.config.max_position_embeddings - ids.shape[1]),
                                     repetition_penalty=1.3, pad_token_id=tok.pad_token_id)
            texts.append(tok.decode(gen[0], skip_special_tokens=True))
        out[label] = texts
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="folder of the runs (benchmarks/llm_scratch.sh OUT_ROOT)")
    p.add_argument("--png", default="docs/llm/loss_curves.png")
    p.add_argument("--json", default="results/llm_scratch.json")
    p.add_argument("--prompts", default="The king said,In the city of,The river")
    p.add_argument("--new-tokens", type=int, default=40)
    args = p.parse_args(argv)
    runs = collect(Path(args.root))
    if not runs:
        raise SystemExit(f"no finished llm-mini-* runs in {args.root}")
    rows, md = table(runs)
    print(md)
    ppl_rows, ppl_md = perplexity_table(runs)
    print()
    print(ppl_md)
    plot(runs, Path(args.png))
    gens = samples(runs, [s.strip() for s in args.prompts.split(",")], args.new_tokens)
    for label, texts in gens.items():
        print(f"\n{label}:")
        for t in texts:
            print(f"  {t!r}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "table": md, "perplexity_rows": ppl_rows,
                                           "perplexity_table": ppl_md, "samples": gens}, indent=1))
    print(f"\nwrote {args.png}, {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
