"""The one training loop for every model family, on ``accelerate``.

The same code runs in one CPU process, in several with DDP (``torchrun`` / ``accelerate launch``)
and with FSDP2: through accelerate's FSDP config (``fsdp_version: 2``, GPU clusters) or with
``train.fsdp=true`` under torchrun on any backend (``moh.train.distributed`` holds the FSDP
specifics; checkpoints always hold full, unsharded state). Models are called as
``model(**batch)`` and return a ``ModelOutput`` (``moh.models.base``): the engine minimises
``out.loss`` as the model made it (the model adds its load-balance term, once) and logs the
model's own ``out.metrics``; it knows nothing else about the task (classifier, decoder, denoiser).

Run directory (``train.out_dir``; who may write it, and when: ``moh.train.rundir``):
    config.yaml  model.safetensors  final.json     the result (``load_run`` reads these)
    metrics.jsonl / .csv  eval.jsonl / .csv  tb/   logs
    checkpoints/step_XXXXXXXX/                     resumable state (see ``moh.train.checkpoint``)
    resumes.jsonl                                  one line per resume: the step, what changed
    .lock                                          held by the run in progress
"""
from __future__ import annotations

import contextlib
import dataclasses
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
from moh.train.finetune import build_model
from moh.train import checkpoint as ckpt
from moh.train import rundir
from moh.train.config import RunConfig, check_data_args
from moh.train.distributed import is_sharded, local_tensor, no_sync, scalar, shard_model
from moh.train.metrics import MetricsLogger, add_metric_sums, count_items, metric_means, read_jsonl, reduce_sums
from moh.train.sampler import EpochKeyedBatches, ResumableBatchSampler, SeededItems
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


def _check(cfg: RunConfig, *, model: bool = True, data: bool = True) -> None:
    """Every value of ``cfg`` (again: it may have changed since it was built), the model preset
    and its overrides (``model``), the data set and its arguments (``data``; converted to their
    annotated types in place). ValueErrors name the key."""
    cfg.validate()
    if model:
        from moh.models import model_config

        spec = model_config(cfg.model.name, **cfg.model.overrides)  # unknown preset / key, bad value
        if hasattr(spec, "attention_configs"):
            spec.attention_configs()  # every layer's MoHConfig checks itself (top_k, heads, ...)
    if data:
        cfg.data.args = check_data_args(cfg.data.name, cfg.data.args)


def _check_model_fits_data(model: nn.Module, data: Dataset, cfg: RunConfig) -> None:
    """One forward of two training items before anything is written: a model that cannot take the
    data (an image model on token data, labels past the last class, ids past the vocabulary) is a
    ValueError naming both, not a traceback from inside the model at step 1."""
    where = f"model {cfg.model.name!r} and data {cfg.data.name!r}"
    labels = getattr(data, "labels", None)
    num_classes = getattr(getattr(model, "cfg", None), "num_classes", None)
    if isinstance(labels, Tensor) and labels.dim() == 1 and labels.numel() and isinstance(num_classes, int):
        if int(labels.max()) >= num_classes or int(labels.min()) < 0:
            raise ValueError(f"{where} do not fit: labels run from {int(labels.min())} to {int(labels.max())}, "
                             f"the model has num_classes={num_classes}")
    vocab, model_vocab = getattr(data, "vocab_size", None), getattr(getattr(model, "cfg", None), "vocab_size", None)
    if isinstance(vocab, int) and isinstance(model_vocab, int) and vocab > model_vocab:
        raise ValueError(f"{where} do not fit: the data uses {vocab} token ids, the model has vocab_size={model_vocab}")
    if len(data) == 0:
        raise ValueError(f"data {cfg.data.name!r} has no training items")
    from torch.utils.data import default_collate

    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            batch = default_collate([data[i] for i in range(min(2, len(data)))])
            model.eval()
            model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
    except (TypeError, IndexError, RuntimeError, KeyError) as e:
        raise ValueError(f"{where} do not fit: a forward of two training items failed with "
                         f"{type(e).__name__}: {e}") from None
    finally:
        model.train(was_training)


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
    dropout); augmentation draws from (seed, epoch, item) (``SeededItems``). With ``train.resume``
    the newest intact checkpoint in ``out_dir/checkpoints`` is restored and the run continues
    exactly where it stopped; its configuration must be the saved one (``moh.train.rundir``). A
    directory that holds another run is refused unless ``train.overwrite``. Nothing is written
    before the data and the model are built and the checks passed; ``out_dir/.lock`` keeps a
    second run out while this one is in progress."""
    _check(cfg, model=model is None, data=train_data is None or eval_data is None)
    accelerator = _accelerator()
    _on_main(accelerator, lambda: rundir.preflight(cfg))  # read-only
    lock = rundir.RunLock(cfg.train.out_dir)
    try:
        return _fit(cfg, accelerator, lock, model, train_data, eval_data)
    finally:
        lock.release(discard=not lock.started)


def _fit(cfg: RunConfig, accelerator, lock: rundir.RunLock, model: Optional[nn.Module], train_data: Optional[Dataset],
         eval_data: Optional[Dataset]) -> FitResult:
    t = cfg.train
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out_dir = Path(t.out_dir)
    if model is None:
        torch.manual_seed(t.seed)  # same init on every process
        model = build_model(cfg.model)
    train_data = train_data if train_data is not None else build_dataset(cfg.data.name, "train", **cfg.data.args)
    if eval_data is None:
        eval_data = build_dataset(cfg.data.name, cfg.data.eval_split, **cfg.data.args)
    _check_model_fits_data(model, train_data, cfg)
    seed_everything(t.seed + rank)
    model, optimizer = _prepare(accelerator, model, cfg)
    raw = accelerator.unwrap_model(model)
    sampler = ResumableBatchSampler(len(train_data), t.batch_size, seed=t.seed, rank=rank, world_size=world)
    start, finished = _restore_or_clean(cfg, accelerator, raw, optimizer, sampler, lock)  # last use of the generators' old state
    if finished:
        return _finished_run(raw, out_dir)
    # item randomness is a function of (seed, epoch, index), whichever worker loads it; the loader
    # gets its own generator so creating its iterator leaves torch's global RNG alone
    batches = iter(DataLoader(SeededItems(train_data, t.seed), batch_sampler=EpochKeyedBatches(sampler),
                              num_workers=t.num_workers, generator=torch.Generator().manual_seed(t.seed)))
    metrics = MetricsLogger(out_dir, "metrics", start_step=start, use_csv=t.metrics_csv, tensorboard=t.tensorboard,
                            enabled=main)
    evals = MetricsLogger(out_dir, "eval", start_step=start, use_csv=t.metrics_csv, tensorboard=t.tensorboard,
                          enabled=main)
    show_bar = t.progress and main and sys.stderr.isatty()  # else a log line every log_every steps
    bar = tqdm(total=t.steps, initial=start, desc="train", disable=not show_bar)
    if main:
        log.info("training %s on %s: steps %d..%d, %d process(es) x batch %d x accum %d, run directory %s",
                 cfg.model.name, cfg.data.name, start, t.steps, world, t.batch_size, t.grad_accum, out_dir)
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
        if main and not show_bar and metrics.records and metrics.records[-1]["step"] == step + 1:
            log.info("%s", _progress_line(metrics.records[-1], start, t.steps, time.perf_counter() - t_run))
    bar.close()
    final = evaluate(raw, eval_data, t.batch_size, t.eval_batches)
    evals.log({"step": t.steps, **final})
    ckpt.save_weights(raw, out_dir / "model.safetensors")  # every process: an FSDP model is gathered
    if main and hasattr(raw, "save_run_files"):  # a transformers model: config.json, tokenizer (moh.hf.run)
        raw.save_run_files(out_dir, train_data)
    if main:
        summary = dict(final, step=t.steps, train_time_s=time.perf_counter() - t_run, resumed_from=start,
                       model_sha256=ckpt.sha256_file(out_dir / "model.safetensors"))
        ckpt.atomic_write_text(out_dir / "final.json", json.dumps(summary, indent=1))
        rundir.finish_overwrite(out_dir)
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


def _on_main(accelerator, fn):
    """``fn()`` on the main process; its ValueError is raised on every process (rather than the
    others waiting at the next barrier). Returns fn's result on the main process, None elsewhere."""
    error, result = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except ValueError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise ValueError(error)
    return result


def _problems_anywhere(accelerator, problem: Optional[str]) -> list[str]:
    """Every process's problem with the checkpoint it just read (so all agree to skip it)."""
    if accelerator.num_processes == 1:
        return [problem] if problem else []
    from accelerate.utils import gather_object

    return [p for p in gather_object([problem]) if p]


def _restore_or_clean(cfg: RunConfig, accelerator, raw: nn.Module, optimizer, sampler: ResumableBatchSampler,
                      lock: rundir.RunLock) -> tuple[int, bool]:
    """Start the run in ``out_dir``: take its lock, check it again under the lock, remove debris
    of interrupted saves / prunes. Resume: restore the newest intact checkpoint (model, optimizer,
    generators, data position); damaged newer ones are renamed ``.damaged-step_*`` with a warning
    saying why. Fresh run (``overwrite``): the old run's files are moved aside. Writes config.yaml
    (a fresh run; a resume only when train.steps changed) and returns (step, already finished)."""
    t, main = cfg.train, accelerator.is_main_process
    out_dir = Path(t.out_dir)
    root = out_dir / "checkpoints"

    def take() -> Optional[RunConfig]:
        lock.acquire()
        saved = rundir.preflight(cfg)  # again: another run may have come and gone since
        gone = ckpt.remove_leftovers(root)
        if gone:
            log.warning("removed what interrupted checkpoint saves / prunes left in %s: %s", root, ", ".join(gone))
        return saved

    saved = _on_main(accelerator, take)
    if t.resume:
        skipped: list[tuple[Path, str]] = []
        for path in reversed(ckpt.list_checkpoints(root)):
            try:
                loaded, problem = ckpt.read_checkpoint(path, model=raw, optimizer=optimizer,
                                                       rank=accelerator.process_index), None
            except ckpt.CheckpointError as e:
                loaded, problem = None, str(e)
            problems = _problems_anywhere(accelerator, problem)
            if problems:
                log.warning("resume: skipping damaged checkpoint %s: %s", path, "; ".join(problems))
                skipped.append((path, "; ".join(problems)))
                continue
            return _resume_from(cfg, accelerator, raw, optimizer, sampler, lock, loaded, saved, skipped)
        if skipped:
            raise ValueError(f"resume: no intact checkpoint in {root}: "
                             + "; ".join(f"{p.name}: {why}" for p, why in skipped))
        log.warning("resume: no checkpoint in %s; starting from step 0", root)
    if main:
        lock.started = True
        if t.overwrite:
            rundir.move_aside(out_dir)
        if saved is None or not t.resume:
            rundir.to_save(cfg).save(out_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return 0, False


def _resume_from(cfg: RunConfig, accelerator, raw, optimizer, sampler, lock, loaded: dict, saved: Optional[RunConfig],
                 skipped: list) -> tuple[int, bool]:
    """Apply a checkpoint ``read_checkpoint`` found intact; record the resume."""
    t, main = cfg.train, accelerator.is_main_process
    out_dir, path, step = Path(t.out_dir), loaded["path"], loaded["state"]["step"]
    if step > t.steps:
        raise ValueError(f"train.steps={t.steps} but the checkpoint {path} is already at step {step}")
    if loaded["state"].get("world_size", accelerator.num_processes) != accelerator.num_processes:
        log.warning("resume: %s was written by %s processes, this run has %d: the data order continues, the "
                    "result is not bit-identical to an uninterrupted run", path, loaded["state"].get("world_size"),
                    accelerator.num_processes)
    state = ckpt.apply_checkpoint(loaded, model=raw, optimizer=optimizer)
    sampler.start = state["micro_batches"]
    finished = step == t.steps and _finished_at(out_dir) == step
    if main:
        lock.started = True
        for p, _ in skipped:
            log.warning("resume: %s renamed to %s", p, ckpt.set_aside(p).name)
        if finished:
            log.info("resume: %s finished at step %d already; nothing to do", out_dir, step)
        else:
            changes = rundir.config_changes(saved, cfg) if saved is not None else {}
            if saved is None or "train.steps" in changes:  # record the new length, nothing else
                keep = saved or cfg
                rundir.to_save(dataclasses.replace(keep, train=dataclasses.replace(keep.train, steps=t.steps))).save(
                    out_dir / "config.yaml")
            if "train.steps" in changes:
                log.warning("resume: train.steps %d -> %d; the learning-rate schedule after step %d follows the "
                            "new total", changes["train.steps"][0], t.steps, step)
            rundir.record_resume(out_dir, step, changes)
            log.info("resumed from %s (step %d)", path, step)
    accelerator.wait_for_everyone()
    return step, finished


def _finished_at(out_dir: Path) -> Optional[int]:
    """The step final.json reports, when it and model.safetensors are there."""
    try:
        final = json.loads((out_dir / "final.json").read_text())
    except (OSError, ValueError):
        return None
    return final.get("step") if isinstance(final, dict) and (out_dir / "model.safetensors").is_file() else None


def _finished_run(raw: nn.Module, out_dir: Path) -> FitResult:
    """The FitResult of a run that had finished before this resume; nothing is written."""
    final = json.loads((out_dir / "final.json").read_text())
    keep = {k: v for k, v in final.items() if k not in ("step", "train_time_s", "resumed_from", "model_sha256")}
    return FitResult(model=raw, history=read_jsonl(out_dir / "metrics.jsonl"), eval=keep, out_dir=out_dir)


def _progress_line(rec: dict, start: int, total: int, seconds: float) -> str:
    """``step 20/100  loss 1.234  acc 0.567  890 items/s  eta 0:01:05`` (the log line printed when
    no progress bar is shown)."""
    done = rec["step"] - start
    eta = seconds / max(done, 1) * (total - rec["step"])
    parts = [f"step {rec['step']}/{total}", f"loss {rec['loss']:.4f}"]
    parts += [f"{k} {rec[k]:.3f}" for k in ("acc", "heads_active") if isinstance(rec.get(k), float)]
    parts.append(f"{rec.get('items_per_s', 0.0):.0f} items/s")
    parts.append(f"eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
    return "  ".join(parts)


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
    """The trained model (eval mode) and resolved config of a finished run directory. The weights
    must fit the configured model exactly, hold no NaN / infinity, and (when final.json records
    it) have the sha256 the run wrote: otherwise a ValueError naming the file."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"{str(out_dir)!r} is not a finished run: "
                         f"{'it is a file, not a directory' if out_dir.exists() else 'no such directory'}")
    for name in ("config.yaml", "model.safetensors"):
        if not (out_dir / name).is_file():
            raise ValueError(f"{str(out_dir)!r} is not a finished run: {name} is missing")
    cfg = rundir.saved_config(out_dir)
    try:
        model = build_model(cfg.model)
    except ValueError as e:
        raise ValueError(f"{out_dir / 'config.yaml'}: {e}") from None
    weights = out_dir / "model.safetensors"
    try:
        recorded = json.loads((out_dir / "final.json").read_text()).get("model_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded and ckpt.sha256_file(weights) != recorded:
        raise ckpt.CheckpointError(f"{weights}: content differs from what the run wrote (sha256 in final.json)")
    ckpt.load_weights(model, weights)
    return model.eval(), cfg
