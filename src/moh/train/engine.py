"""The one training loop for every model family, on ``accelerate``.

The same code runs in one CPU process, in several with DDP (``torchrun`` / ``accelerate launch``)
and with FSDP2: through accelerate's FSDP config (``fsdp_version: 2``, GPU clusters) or with
``train.fsdp=true`` under torchrun on any backend (``moh.train.distributed`` holds the FSDP
specifics; checkpoints always hold full, unsharded state). Models are called as
``model(**batch)`` and return a ``ModelOutput`` (``moh.models.base``): the engine minimises
``out.loss`` as the model made it (the model adds its load-balance term, once) and logs the
model's own ``out.metrics``; it knows nothing else about the task (classifier, decoder, denoiser).

Run directory (``train.out_dir``):
    config.yaml  model.safetensors  final.json     the result (``load_run`` reads these)
    metrics.jsonl / .csv  eval.jsonl / .csv  tb/   logs
    checkpoints/step_XXXXXXXX/                     resumable state (see ``moh.train.checkpoint``)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from moh.data import build_dataset
from moh.models import create_model
from moh.train import checkpoint as ckpt
from moh.train.config import RunConfig
from moh.train.distributed import is_sharded, local_tensor, no_sync, scalar, shard_model
from moh.train.metrics import MetricsLogger, add_metric_sums, count_items, metric_means, reduce_sums
from moh.train.sampler import ResumableBatchSampler
from moh.train.schedule import lr_at

log = logging.getLogger(__name__)



@dataclass
class FitResult:
    model: nn.Module  # unwrapped (under FSDP still sharded: moh.train.distributed.gather_full_state)
    history: list[dict] = field(default_factory=list)  # one dict per logged step
    eval: dict = field(default_factory=dict)  # final evaluation: loss, acc, heads_active, n
    out_dir: Path = Path(".")


# ---------------------------------------------------------------------------------------------
# evaluation


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 64, max_batches: int = 0) -> dict:
    """The model's own metrics (``ModelOutput.metrics``: sum / count) over ``data`` (or its first
    ``max_batches`` batches per process); ``loss`` is the task loss per counted prediction (tokens for
    decoders), ``n`` the number of items. Under torch.distributed each process evaluates every
    world_size-th item and the sums are all-reduced, so every process returns the same dict."""
    rank, world = _dist_world()
    device = next(model.parameters()).device
    shard = Subset(data, range(rank, len(data), world)) if world > 1 else data
    loader = DataLoader(shard, batch_size=batch_size)
    n_batches = min(len(loader), max_batches) if max_batches else len(loader)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"n": 0.0}
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        add_metric_sums(sums, model(**batch).metrics)
        sums["n"] += _batch_size(batch)
    if is_sharded(model):
        _match_forwards(model, data, n_batches, batch_size, max_batches, world, device)
    model.train(was_training)
    if world > 1:
        sums = reduce_sums(sums, _all_reduce_sum)
    means = metric_means(sums)
    if "task_loss" in means:
        means = {"loss": means.pop("task_loss"), **means}
    return {**means, "n": int(sums["n"])}


def _batch_size(batch: dict) -> int:
    return next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]


def _match_forwards(model: nn.Module, data: Dataset, done: int, batch_size: int, max_batches: int, world: int,
                    device) -> None:
    """An FSDP forward is a collective (it all-gathers the parameters): a process with fewer eval
    batches than process 0 (which has the most items) runs uncounted forwards until they match."""
    most = math.ceil(math.ceil(len(data) / world) / batch_size)
    most = min(most, max_batches) if max_batches else most
    if most > done:
        spare = {k: v.to(device) for k, v in next(iter(DataLoader(data, batch_size=1))).items()}
        for _ in range(most - done):
            model(**spare)


def _all_reduce_sum(t: Tensor) -> Tensor:
    # gloo reduces CPU tensors; NCCL needs them on the GPU
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


# ---------------------------------------------------------------------------------------------
# setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings of position/class (1-D tensors and
    tensors named *pos_embed / cls_token*), the usual ViT / LLaMA practice."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.dim() < 2 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if flat else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _check(cfg: RunConfig) -> None:
    t, o = cfg.train, cfg.optim
    for name, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                        ("train.log_every", t.log_every)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    for name, value in (("train.save_every", t.save_every), ("train.eval_every", t.eval_every),
                        ("optim.warmup_steps", o.warmup_steps), ("optim.grad_clip", o.grad_clip)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if len(o.betas) != 2:
        raise ValueError(f"optim.betas={o.betas} must be two numbers")


def _touch_all_params(model: nn.Module) -> Tensor:
    """0 * (sum of every parameter): adds exact zeros to every gradient, so a parameter the forward
    did not use this step (a module a variant skips, an extra head of a converted model) gets a
    zero gradient instead of none. Without it DDP fails ("Expected to have finished reduction");
    with it DDP needs no find_unused_parameters (a graph search every step), and AdamW treats such
    a parameter the same in one process and in many (zero gradient: moments decay). Under FSDP
    the root's parameters are still unsharded here (their zeros join what FSDP reduce-scatters),
    a block's are DTensor shards again (the zeros go to the local shard, where FSDP adds the
    reduced gradient). FSDP needs a parameter unused on every process or on none."""
    return sum(local_tensor(p).sum() for p in model.parameters() if p.requires_grad) * 0.0


# ---------------------------------------------------------------------------------------------
# the loop


class _Window:
    """Sums of training statistics since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.seconds = 0.0  # wall time of this process's steps

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def pop(self, reduce) -> dict[str, float]:
        sums = reduce_sums(self.sums, reduce)
        self.sums, self.steps, self.seconds = {}, 0, 0.0
        return sums


def _train_step(model, optimizer, accelerator, micro_batches: list[dict], grad_clip: float, window: _Window) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches, minimising the models' own ``loss``
    (the balance term included by the model); returns this process's loss (mean over the
    micro-batches), metric sums and items."""
    accum = len(micro_batches)
    local: dict[str, float] = {"loss": 0.0, "items": 0.0}
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        # gradients are all-reduced once per step: skip the sync on all but the last micro-batch
        sync = contextlib.nullcontext() if i == accum - 1 else no_sync(model, accelerator)
        with sync:
            out = model(**batch)
            if out.loss is None:
                raise ValueError(f"{type(accelerator.unwrap_model(model)).__name__} returned no loss for a training "
                                 f"batch with keys {sorted(batch)}: the data set gives no targets for this model")
            if not torch.isfinite(out.loss):
                parts = ", ".join(f"{k} {float(v):.4g}" for k, v in (("task", out.task_loss), ("aux", out.aux_loss))
                                  if v is not None)
                raise FloatingPointError(f"loss is {out.loss.item()} ({parts})")
            accelerator.backward((out.loss + _touch_all_params(model)) / accum)
        local["loss"] += out.loss.item() / accum
        local["items"] += count_items(batch)
        add_metric_sums(local, out.metrics)
    window.add(**local)
    if grad_clip > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        window.add(grad_norm=scalar(norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    hook = getattr(accelerator.unwrap_model(model), "after_optimizer_step", None)
    if hook is not None:  # e.g. an EMA of the weights (DiT): state the model keeps in its buffers
        hook()
    window.steps += 1
    return local


def fit(cfg: RunConfig, *, model: Optional[nn.Module] = None, train_data: Optional[Dataset] = None,
        eval_data: Optional[Dataset] = None) -> FitResult:
    """Train ``cfg``'s model (or ``model``) on ``cfg``'s data (or the given data sets).

    ``train.seed`` seeds model init, data order and dropout (process r uses seed + r for
    dropout). With ``train.resume`` the latest checkpoint in ``out_dir/checkpoints`` is restored and
    the run continues exactly where it stopped; without it, old checkpoints there are removed."""
    _check(cfg)
    t = cfg.train
    accelerator = _accelerator()
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out_dir = Path(t.out_dir)
    if model is None:
        torch.manual_seed(t.seed)  # same init on every process
        model = create_model(cfg.model.name, **cfg.model.overrides)
    train_data = train_data if train_data is not None else build_dataset(cfg.data.name, "train", **cfg.data.args)
    if eval_data is None:
        eval_data = build_dataset(cfg.data.name, cfg.data.eval_split, **cfg.data.args)
    seed_everything(t.seed + rank)
    model, optimizer = _prepare(accelerator, model, cfg)
    raw = accelerator.unwrap_model(model)
    sampler = ResumableBatchSampler(len(train_data), t.batch_size, seed=t.seed, rank=rank, world_size=world)
    start = _restore_or_clean(cfg, accelerator, raw, optimizer, sampler)  # last use of the generators' old state
    # the loader gets its own generator so creating its iterator leaves torch's global RNG alone
    batches = iter(DataLoader(train_data, batch_sampler=sampler, num_workers=t.num_workers,
                              generator=torch.Generator().manual_seed(t.seed)))
    metrics = MetricsLogger(out_dir, "metrics", start_step=start, use_csv=t.metrics_csv, tensorboard=t.tensorboard,
                            enabled=main)
    evals = MetricsLogger(out_dir, "eval", start_step=start, use_csv=t.metrics_csv, tensorboard=t.tensorboard,
                          enabled=main)
    if main:
        cfg.save(out_dir / "config.yaml")
    bar = tqdm(total=t.steps, initial=start, desc="train", disable=not (t.progress and main and sys.stderr.isatty()))
    window, t_run = _Window(), time.perf_counter()
    for step in range(start, t.steps):
        lr = lr_at(step, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps, total_steps=t.steps,
                   min_lr_ratio=cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        local = _train_step(model, optimizer, accelerator, [next(batches) for _ in range(t.grad_accum)],
                            cfg.optim.grad_clip, window)
        seconds = time.perf_counter() - t0
        window.seconds += seconds  # step time only: logging, eval, saving excluded
        bar.update(1)
        shown = metric_means(local)
        bar.set_postfix(loss=f"{local['loss']:.3f}", **{k: f"{shown[k]:.3f}" for k in ("acc", "heads_active") if k in shown},
                        items_s=f"{local['items'] * world / seconds:.0f}", refresh=False)
        _after_step(step + 1, cfg, accelerator, raw, optimizer, eval_data, window, lr, metrics, evals)
    bar.close()
    final = evaluate(raw, eval_data, t.batch_size, t.eval_batches)
    evals.log({"step": t.steps, **final})
    ckpt.save_weights(raw, out_dir / "model.safetensors")  # every process: an FSDP model is gathered
    if main:
        summary = dict(final, step=t.steps, train_time_s=time.perf_counter() - t_run, resumed_from=start)
        ckpt.atomic_write_text(out_dir / "final.json", json.dumps(summary, indent=1))
    metrics.close()
    evals.close()
    accelerator.wait_for_everyone()
    return FitResult(model=raw, history=metrics.records, eval=final, out_dir=out_dir)


def _accelerator():
    from accelerate import Accelerator, DistributedType

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        # FSDP1 flattens parameters: the optimizer's parameter order is not the plain model's
        raise ValueError("accelerate's FSDP config has fsdp_version 1; set fsdp_version: 2 (FSDP2)")
    return accelerator


def _prepare(accelerator, model: nn.Module, cfg: RunConfig):
    """(model, optimizer) ready to train. accelerate wraps the model in DDP, or shards it itself
    under its FSDP config. With ``train.fsdp`` (and no such config) the model is sharded here and
    accelerate prepares only the optimizer: it would wrap the sharded model in DDP."""
    from accelerate import DistributedType

    if cfg.train.fsdp and accelerator.distributed_type != DistributedType.FSDP:
        model = shard_model(model.to(accelerator.device))
        return model, accelerator.prepare(build_optimizer(model, cfg.optim))  # after sharding: holds the shards
    if cfg.train.fsdp:
        log.info("train.fsdp: accelerate's FSDP config shards the model")
    return accelerator.prepare(model, build_optimizer(model, cfg.optim))


def _restore_or_clean(cfg: RunConfig, accelerator, raw: nn.Module, optimizer, sampler: ResumableBatchSampler) -> int:
    """Resume: load the latest checkpoint (model, optimizer, generators, data position) and return
    its step. Fresh run: remove old checkpoints (they belong to another run) and return 0."""
    root = Path(cfg.train.out_dir) / "checkpoints"
    if not cfg.train.resume:
        if accelerator.is_main_process and ckpt.list_checkpoints(root):
            log.warning("removing old checkpoints in %s (fresh run; pass resume to continue them)", root)
            for p in ckpt.list_checkpoints(root):
                ckpt.remove_dir(p)
        accelerator.wait_for_everyone()
        return 0
    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        log.warning("resume: no checkpoint in %s; starting from step 0", root)
        return 0
    state = ckpt.load_checkpoint(latest, model=raw, optimizer=optimizer, rank=accelerator.process_index)
    if state["step"] > cfg.train.steps:
        raise ValueError(f"train.steps={cfg.train.steps} but the checkpoint {latest} is already at step {state['step']}")
    sampler.start = state["micro_batches"]
    log.info("resumed from %s (step %d)", latest, state["step"])
    return state["step"]


def _after_step(done: int, cfg: RunConfig, accelerator, raw, optimizer, eval_data, window, lr, metrics, evals) -> None:
    """Logging, periodic evaluation and checkpointing after ``done`` optimizer steps."""
    t = cfg.train
    if done % t.log_every == 0 or done == t.steps:
        metrics.log(_log_record(window, done, lr, accelerator.num_processes, lambda x: accelerator.reduce(x, "sum")))
    if t.eval_every and done % t.eval_every == 0 and done != t.steps:
        evals.log({"step": done, **evaluate(raw, eval_data, t.batch_size, t.eval_batches)})
    if (t.save_every and done % t.save_every == 0) or done == t.steps:
        ckpt.save_checkpoint(Path(t.out_dir) / "checkpoints", done, model=raw, optimizer=optimizer,
                             state={"micro_batches": done * t.grad_accum, "world_size": accelerator.num_processes},
                             rank=accelerator.process_index, barrier=accelerator.wait_for_everyone,
                             keep_last=t.keep_last)


def _log_record(window: _Window, step: int, lr: float, world: int, reduce) -> dict:
    """Means over the window's steps (and processes) of the training statistics; items_per_s
    counts every process's items per second of step time."""
    steps, seconds = window.steps, window.seconds
    sums = window.pop(reduce)
    per_step = steps * world
    rec = {"step": step, "loss": sums["loss"] / per_step, **metric_means(sums)}
    rec["lr"] = lr
    rec["items_per_s"] = sums["items"] / max(seconds, 1e-9)
    rec["step_time_s"] = seconds / max(steps, 1)
    if "grad_norm" in sums:
        rec["grad_norm"] = sums["grad_norm"] / per_step
    return rec


def load_run(out_dir: str | Path) -> tuple[nn.Module, RunConfig]:
    """The trained model (eval mode) and resolved config of a finished run directory."""
    out_dir = Path(out_dir)
    for name in ("config.yaml", "model.safetensors"):
        if not (out_dir / name).is_file():
            raise ValueError(f"{str(out_dir)!r} is not a finished run: {name} is missing")
    cfg = RunConfig.load(out_dir / "config.yaml")
    model = create_model(cfg.model.name, **cfg.model.overrides)
    ckpt.load_weights(model, out_dir / "model.safetensors")
    return model.eval(), cfg
