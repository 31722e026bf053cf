"""``moh demo [--out DIR] [--steps N] [--quick] [--seed S]``: the main job.

Trains three small causal decoders (multi-head attention, MoH with 75% and with 50% of the heads
per token) on multi-query associative recall (MQAR, generated on the fly: nothing to download)
with the project's training loop, then prints one table (held-out recall accuracy, parameters,
measured heads active, and the speed a user compares: each trained model with the ``sparse``
backend against the multi-head model with fused SDPA attention, on a long prefill, decode tokens
per second over a long context and a training step on a long sequence) and writes into the output
folder:

    table.md  table.json       the table (and the settings that produced it)
    loss_curves.png            training loss and accuracy of the three models
    <moh model>/routing/*.png  head load per token role (context key / value / query key / other)
    <model>/...                the training run (config.yaml, model.safetensors, metrics.jsonl)
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moh.eval import num_threads

log = logging.getLogger(__name__)

MODELS = ("llm-demo-mha", "moh-llm-demo-75", "moh-llm-demo-50")
NEXT_STEPS = (
    ("moh bench", "latency and memory of the backends against SDPA multi-head attention"),
    ("moh train configs/fmnist-vit-tiny-moh50.yaml", "train an MoH ViT on Fashion-MNIST (moh data fetch fashion-mnist first)"),
    ("moh analyze {run} --out {out}/analyze --max-batches 8", "routing pictures of a finished run"),
    ("make test", "the test suite"),
)


@dataclass
class DemoPlan:
    """Everything that sets the demo's size. ``full()`` fits ~5 minutes on 2 CPU cores."""

    data: dict = field(default_factory=dict)  # MQAR arguments (moh.data.recall.MQAR)
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    eval_batches: int = 8  # held-out examples = eval_batches * batch_size
    log_every: int = 10
    # speed, each model with the sparse backend against the multi-head model (router "all": the
    # sparse backend then runs every layer as one fused SDPA call over all heads). MoH saves a
    # fraction of the attention, which dominates these small models only over long sequences
    # (1 thread: MoH-50 prefill 0.84x of MHA at 1024 tokens, 1.12x at 2048, 1.25x at 4096)
    speed_len: int = 4096  # tokens of the batch-1 prefill
    decode_context: int = 4096  # cached tokens before the timed decode steps
    decode_batch: int = 1  # sequences decoded together
    decode_tokens: int = 16  # timed decode steps (one new token per sequence each)
    train_len: int = 2048  # tokens of the batch-1 training step (forward + backward)
    speed_reps: int = 5  # timed repeats per model (median), the models interleaved
    overrides: dict = field(default_factory=dict)  # model preset overrides (quick mode shrinks)

    @classmethod
    def full(cls) -> "DemoPlan":
        # MQAR is learned through a phase transition (an induction circuit forms) whose timing
        # varies with the seed. What made it reliable (docs/results/demo.md): lr 1e-3 without
        # weight decay (at 3e-3 / 0.05 some seeds of every model sat on the 1/3 plateau for
        # 1000 steps) and 10 queries per sequence instead of 3 (more supervised positions per
        # step, same cost). 3 pairs: with 4 or more the transition comes later.
        # Training runs on the masked backend: at 32 tokens the sparse backend's per-head gathers
        # cost more than they save (MoH-50: 75 vs 57 ms CPU per step).
        # max_seq_len 8192: RoPE positions are no parameters, and the speed test needs 4096 + 16
        return cls(data=dict(num_examples=100_000, seq_len=32, num_kv_pairs=3, num_queries=10, vocab_size=64),
                   overrides=dict(backend="masked", max_seq_len=8192))

    @classmethod
    def quick(cls) -> "DemoPlan":
        """Seconds: a smoke run of every piece (the numbers mean nothing)."""
        return cls(data=dict(num_examples=256, seq_len=16, num_kv_pairs=2, vocab_size=16), steps=6, batch_size=8,
                   warmup_steps=2, eval_batches=2, log_every=2, speed_len=64, decode_context=32, decode_tokens=2,
                   train_len=32, speed_reps=2, overrides=dict(vocab_size=16, max_seq_len=128, backend="masked"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (default: runs/demo-<timestamp>)")
    p.add_argument("--steps", type=int, help="training steps per model (default: 800; --quick: 6)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke version (tiny steps and sizes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and of the data (default: 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; these models are small, and two threads stall "
                        "badly when other jobs share the cores)")


def run(args: argparse.Namespace) -> int:
    plan = DemoPlan.quick() if args.quick else DemoPlan.full()
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps={args.steps} must be >= 1")
        plan.steps = args.steps
    if args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be >= 1")
    with num_threads(args.threads):  # run() may be called in-process (tests)
        return _run(plan, args)


def _run(plan: DemoPlan, args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, histories, models = [], {}, {}
    for name in MODELS:
        log.info("demo: training %s (%d steps)", name, plan.steps)
        res = train_one(name, plan, out / name, args.seed)
        histories[name] = res.history
        models[name] = res.model
        rows.append(measure(name, res, plan))
        if name != MODELS[0]:  # multi-head attention uses every head: nothing to picture
            write_routing(res.model, plan, args.seed, out / name / "routing", name)
    log.info("demo: speed of the trained models (sparse backend) against multi-head attention")
    for row, speed in zip(rows, measure_speed(models, plan, args.seed)):
        row.update(speed)
    wall = time.perf_counter() - t0
    write_table(rows, plan, args.seed, wall, out)
    plot_curves(histories, out / "loss_curves.png")
    print_summary(rows, plan, wall, out)
    return 0


def print_summary(rows: list[dict], plan: DemoPlan, wall: float, out: Path) -> None:
    d = plan.data
    print(format_table(rows))
    print(f"\nMQAR: {d['num_kv_pairs']} key-value pairs and {d.get('num_queries', d['num_kv_pairs'])} queries in "
          f"{d['seq_len']} tokens, vocabulary {d['vocab_size']} "
          f"(chance {rows[0]['chance']:.3f}); {plan.steps} steps x {plan.batch_size} sequences per model "
          f"(backend {plan.overrides.get('backend', 'preset')}). Speed: every trained model with the sparse "
          f"backend, (x) = against {MODELS[0]} (router 'all': fused SDPA over all heads); prefill 1 x "
          f"{plan.speed_len} tokens; decode {plan.decode_batch} x {plan.decode_tokens} new tokens after "
          f"{plan.decode_context} cached; training step (forward + backward) on 1 x {plan.train_len} tokens; "
          f"{torch_threads()} thread(s). Wall time {wall:.0f} s.")
    print(f"Wrote {out}/: table.md, table.json, loss_curves.png, <moh model>/routing/head_load.png and the runs.")
    print("\nWhat to run next:")
    for cmd, why in NEXT_STEPS:
        print(f"  {cmd.format(run=out / MODELS[-1], out=out):<56} # {why}")


# ---------------------------------------------------------------------------------------------


def train_one(name: str, plan: DemoPlan, out_dir: Path, seed: int):
    """One run of the project's training loop; returns its ``FitResult``."""
    from moh.train import DataSpec, LoopConfig, ModelSpec, OptimConfig, RunConfig
    from moh.train.engine import fit

    cfg = RunConfig(
        model=ModelSpec(name, dict(plan.overrides)),
        data=DataSpec("mqar", dict(plan.data, seed=seed)),
        optim=OptimConfig(lr=plan.lr, weight_decay=plan.weight_decay, warmup_steps=plan.warmup_steps),
        train=LoopConfig(steps=plan.steps, batch_size=plan.batch_size, seed=seed, log_every=plan.log_every,
                         eval_batches=plan.eval_batches, out_dir=str(out_dir), progress=False, tensorboard=False,
                         keep_last=1),
    )
    return fit(cfg)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def measure(name: str, res, plan: DemoPlan) -> dict:
    """One table row from a finished run (the speed columns come from ``measure_speed``)."""
    from moh.data import build_dataset

    chance = build_dataset("mqar", "test", **plan.data).chance_accuracy()
    step_ms = [1000 * r["step_time_s"] for r in res.history if "step_time_s" in r]
    return {
        "model": name,
        "accuracy": res.eval["acc"],
        "chance": chance,
        "parameters": sum(p.numel() for p in res.model.parameters()),
        "heads_active": res.eval["heads_active"],
        "train_step_ms": statistics.median(step_ms) if step_ms else float("nan"),
    }


def measure_speed(models: dict, plan: DemoPlan, seed: int) -> list[dict]:
    """Prefill ms, decode tokens/s and long training step ms of every model with the ``sparse``
    backend, the models timed interleaved (one repeat of each in turn, so all see the same machine
    load; median of ``plan.speed_reps``), each also as a ratio to the first model (multi-head
    attention: with router "all" the sparse backend is one fused SDPA call over all heads). The
    models' backends and modes are restored afterwards."""
    import torch

    from moh.core.attention import MoHAttention, set_backend
    from moh.hf.compat import output_cache

    g = torch.Generator().manual_seed(seed)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(1, vocab, (1, plan.speed_len), generator=g)
    context = torch.randint(1, vocab, (plan.decode_batch, plan.decode_context), generator=g)
    token = torch.randint(1, vocab, (plan.decode_batch, 1), generator=g)
    sample = torch.randint(1, vocab, (1, plan.train_len), generator=g)
    before = {n: (next(a.cfg.backend for a in m.modules() if isinstance(a, MoHAttention)), m.training)
              for n, m in models.items()}
    calls = {}
    for name, model in models.items():
        set_backend(model, "sparse")
        model.eval()
        with torch.inference_mode():
            cache = output_cache(model(input_ids=context, use_cache=True))

        def prefill(model=model):
            with torch.inference_mode():
                model(input_ids=prompt)

        def decode(model=model, cache=cache):
            with torch.inference_mode():
                for _ in range(plan.decode_tokens):
                    model(input_ids=token, past_key_values=cache, use_cache=True)
            cache.crop(-plan.decode_tokens)  # every repeat decodes after the same context

        def train_step(model=model):
            model.train()
            model.zero_grad(set_to_none=True)
            model(input_ids=sample, labels=sample).loss.backward()
            model.zero_grad(set_to_none=True)
            model.eval()

        calls[name] = {"prefill_ms": prefill, "decode_ms": decode, "train_long_ms": train_step}
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in c} for n, c in calls.items()}
    for rep in range(plan.speed_reps + 1):  # the first round warms up and is not counted
        for kind in ("prefill_ms", "decode_ms", "train_long_ms"):
            for name in calls:
                t = time.perf_counter()
                calls[name][kind]()
                if rep:
                    times[name][kind].append(1000 * (time.perf_counter() - t))
    for name, model in models.items():
        set_backend(model, before[name][0])
        model.train(before[name][1])
    rows = []
    for name in models:
        med = {k: statistics.median(v) for k, v in times[name].items()}
        rows.append({"prefill_ms": med["prefill_ms"], "train_long_ms": med["train_long_ms"],
                     "decode_tok_s": 1000 * plan.decode_batch * plan.decode_tokens / med["decode_ms"]})
    base = rows[0]
    for r in rows:
        r["prefill_vs_mha"] = base["prefill_ms"] / r["prefill_ms"]
        r["decode_vs_mha"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["train_long_vs_mha"] = base["train_long_ms"] / r["train_long_ms"]
    return rows


def write_routing(model, plan: DemoPlan, seed: int, out_dir: Path, title: str) -> None:
    """Head-load pictures over held-out MQAR, tokens grouped by their role in the task."""
    from torch.utils.data import DataLoader

    from moh.analysis import collect_routing, write_pictures
    from moh.data import build_dataset
    from moh.data.recall import TOKEN_GROUP_NAMES, token_groups

    data = build_dataset("mqar", "test", **dict(plan.data, seed=seed))
    pairs = plan.data["num_kv_pairs"]
    rec = collect_routing(
        model, DataLoader(data, batch_size=plan.batch_size),
        group_fn=lambda b: token_groups(b["input_ids"], b["labels"], pairs),
        group_names=TOKEN_GROUP_NAMES, max_batches=plan.eval_batches,
    )
    write_pictures(rec, out_dir, title=f"{title} on MQAR")


# ---------------------------------------------------------------------------------------------
# the table and the curves

COLUMNS = (  # key, header, format
    ("model", "model", "{}"),
    ("accuracy", "MQAR accuracy", "{:.3f}"),
    ("parameters", "params", "{:,}"),
    ("heads_active", "heads active", "{:.2f}"),
    ("prefill", "prefill ms (x MHA)", "{}"),
    ("decode", "decode tokens/s (x MHA)", "{}"),
    ("train_long", "train step ms (x MHA)", "{}"),
    ("train_step_ms", "demo train step ms", "{:.1f}"),
)
_PAIRS = {"prefill": ("prefill_ms", "prefill_vs_mha", "{:.1f}"), "decode": ("decode_tok_s", "decode_vs_mha", "{:.0f}"),
          "train_long": ("train_long_ms", "train_long_vs_mha", "{:.1f}")}


def _cell(row: dict, key: str, fmt: str) -> str:
    if key in _PAIRS:
        value, ratio, vfmt = _PAIRS[key]
        return f"{vfmt.format(row[value])} ({row[ratio]:.2f}x)"
    return fmt.format(row[key])


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``rows`` (the printed and the saved one are the same)."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, k, fmt) for k, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_table(rows: list[dict], plan: DemoPlan, seed: int, wall: float, out: Path) -> None:
    (out / "table.md").write_text(format_table(rows) + "\n")
    doc = {"rows": rows, "plan": asdict(plan), "seed": seed, "wall_time_s": wall}
    (out / "table.json").write_text(json.dumps(doc, indent=1))


def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Training task loss and accuracy against step, one line per model (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in histories.items():
        steps = [r["step"] for r in hist]
        ax_loss.plot(steps, [r["task_loss"] for r in hist], label=name)
        ax_acc.plot(steps, [r["acc"] for r in hist], label=name)
    ax_loss.set(xlabel="step", ylabel="task loss (recall tokens)", yscale="log", title="MQAR training loss")
    ax_acc.set(xlabel="step", ylabel="accuracy (train batches)", ylim=(0, 1), title="MQAR training accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
