"""``moh eval`` of a language model: validation perplexity, the fraction of heads each layer uses,
and lm-eval tasks.

    moh eval RUN_DIR                                   # perplexity on the run's validation tokens
    moh eval MODEL_DIR --tokens data/english/tokens    # any moh model directory
    moh eval RUN_DIR --tasks moh_heldout --include-path data/english/tasks    # offline local tasks
    moh eval RUN_DIR --tasks hellaswag,piqa            # online: the paper's benchmarks, unchanged

Tasks run through the standard harness: ``lm_eval.simple_evaluate`` on the model object wrapped
in lm-eval's ``HFLM`` (no model path, no ``trust_remote_code``). With ``--include-path`` (task YAMLs
written by ``moh data tasks``) the Hugging Face hub and datasets are set offline
(``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``, unless already set). The result is one JSON file
(``RUN_DIR/eval_<split>_<backend>.json`` or ``--out``), written atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def add_lm_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("language models (perplexity, lm-eval tasks)")
    g.add_argument("--tokens", default=None, help="token directory for perplexity (default: the run's data)")
    g.add_argument("--tasks", default="", help="lm-eval tasks, comma separated (e.g. moh_heldout; hellaswag online)")
    g.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs (moh data tasks --out)")
    g.add_argument("--num-fewshot", type=int, default=0, help="lm-eval few-shot examples (default 0)")
    g.add_argument("--limit", type=int, default=0, help="lm-eval items per task at most (default 0: all)")
    g.add_argument("--lm-batch-size", type=int, default=8, help="sequences per forward for language models (default 8)")
    g.add_argument("--heads-batches", type=int, default=8, help="batches the per-layer heads-active count uses")


def is_language_model_dir(path: str | Path) -> bool:
    """True for a moh language-model run or model directory (its config.json says model_type moh)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "moh"
    except (OSError, ValueError, AttributeError):
        return False


def check_lm_args(args: argparse.Namespace) -> list[str]:
    """The task names; ValueError naming a bad value."""
    for name in ("lm_batch_size", "heads_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("num_fewshot", "limit"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path={args.include_path!r} is not a directory (make it with moh data tasks --out)")
    return tasks


def perplexity_data(model_dir: Path, tokens: Optional[str], split: str, context: int):
    """The token windows to measure perplexity on: ``tokens`` (a token directory) or the run's own
    data set; None when neither is there (a bare model directory without --tokens)."""
    from moh.data import build_dataset

    if tokens is not None:
        return build_dataset("text", split, root=tokens, seq_len=min(context, 1024))
    if not (model_dir / "config.yaml").is_file():
        return None
    from moh.train.config import check_data_args
    from moh.train.rundir import saved_config

    cfg = saved_config(model_dir)
    return build_dataset(cfg.data.name, split, **check_data_args(cfg.data.name, cfg.data.args))


def layer_heads_active(model, data, batch_size: int, max_batches: int) -> list[float]:
    """Measured fraction of heads each token uses, per layer (``moh.analysis.collect_routing``)."""
    from torch.utils.data import DataLoader

    from moh.analysis import collect_routing

    rec = collect_routing(model, DataLoader(data, batch_size=batch_size), max_batches=max_batches)
    return [round(float(x), 4) for x in rec.active_fraction]


def run_tasks(model, tokenizer, tasks: list[str], args: argparse.Namespace) -> dict:
    """lm-eval's results per task (``simple_evaluate`` on the model object)."""
    if args.include_path is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}" + (f" (local tasks in {args.include_path!r}: "
                         f"{sorted(set(manager.all_tasks) - set(TaskManager().all_tasks))})" if args.include_path else ""))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.lm_batch_size, device=str(model.device),
              max_length=model.config.max_position_embeddings)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit or None,
                                  task_manager=manager, log_samples=False)
    return {name: {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
            for name, res in out["results"].items()}


def run_lm_eval(args: argparse.Namespace, out: Path) -> int:
    """``moh eval`` of a language-model directory: writes ``out`` and prints a summary."""
    import torch
    from transformers.utils import logging as hf_logging

    from moh.core.attention import set_backend
    from moh.hf.run import load_model_dir
    from moh.train.checkpoint import atomic_write_text
    from moh.train.engine import evaluate

    tasks = check_lm_args(args)
    hf_logging.disable_progress_bar()
    model_dir = Path(args.run_dir)
    model, tokenizer = load_model_dir(model_dir, tokenizer=bool(tasks))
    set_backend(model, args.backend)
    result: dict[str, Any] = dict(model_dir=str(model_dir), backend=args.backend, split=args.split,
                                  threads=torch.get_num_threads(), model_heads_active=model.config.active_fraction)
    data = perplexity_data(model_dir, args.tokens, args.split, model.config.max_position_embeddings)
    if data is None and not tasks:
        raise ValueError(f"{str(model_dir)!r} is a model directory, not a run: give --tokens DIR for perplexity "
                         f"and/or --tasks")
    vocab = getattr(data, "vocab_size", None)
    if isinstance(vocab, int) and vocab > model.config.vocab_size:  # ids past the embedding: an IndexError later
        raise ValueError(f"token data {getattr(data, 'root', args.tokens or model_dir)!s} uses {vocab} token ids; the "
                         f"model in {str(model_dir)!r} has vocab_size={model.config.vocab_size} (tokenise with the "
                         f"model's own tokenizer)")
    if data is not None and isinstance(getattr(data, "split", None), str):
        result["data_split"] = data.split  # the token file's split ("test" reads the validation tokens)
    t0 = time.perf_counter()
    if data is not None:
        ev = evaluate(model, data, batch_size=args.lm_batch_size, max_batches=args.max_batches)
        if not ev.get("n") or not math.isfinite(ev["loss"]):
            raise ValueError(f"perplexity of {model_dir} on {args.split} is not a result: {ev}")
        result.update(loss=ev["loss"], perplexity=math.exp(ev["loss"]), heads_active=ev["heads_active"],
                      sequences=ev["n"],
                      layer_heads_active=layer_heads_active(model, data, args.lm_batch_size, args.heads_batches))
    if tasks:
        result["tasks"] = run_tasks(model, tokenizer, tasks, args)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(out, json.dumps(result, indent=1))
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    lines = []
    if "perplexity" in result:
        split = result["split"]
        if result.get("data_split", split) != split:
            split = f"{split} (= the {result['data_split']} split)"
        lines.append(f"{result['model_dir']}  {split}  backend {result['backend']}  "
                     f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
                     f"heads active {result['heads_active']:.3f} (per layer {result['layer_heads_active']})")
    for name, metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        lines.append(f"  {name}: {shown}")
    return "\n".join(lines)


__all__ = ["add_lm_arguments", "is_language_model_dir", "run_lm_eval", "run_tasks", "layer_heads_active",
           "perplexity_data"]
