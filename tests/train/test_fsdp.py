"""FSDP2 (train.fsdp=true) with two gloo processes under torchrun: the same parameters as one plain
process with the same global batch, checkpoints that a plain model loads, exact resume, and zero
gradients for a parameter no forward uses. A tiny MoH decoder with tied embeddings."""
import ast
import json
import shutil
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model

from moh.models import create_model
from moh.train import checkpoint as ckpt
from moh.train.config import RunConfig
from moh.train.engine import build_optimizer, load_run

from .conftest import REPO
from .test_distributed import ENV, WORKER, free_port

DECODER = {"depth": 2, "dim": 32, "num_heads": 4, "num_shared": 1, "top_k": 2, "vocab_size": 32, "max_seq_len": 16}
# aux_loss_coef=0: the load-balance loss of a batch is not the mean of its halves' (DDP differs the
# same way), the task loss is. grad_clip=0.05 is below every gradient norm here: clipping acts.
# 41 items: the processes get 21 and 20, so FSDP evaluation needs the padding forwards.
SETS = ["train.steps=4", "train.save_every=2", "train.keep_last=0", "train.log_every=1", "train.grad_accum=2",
        "optim.eps=1e-6", "optim.grad_clip=0.05", "model.name=moh-llm-tiny-50",
        "model.overrides={depth: 2, dim: 32, num_heads: 4, num_shared: 1, top_k: 2, vocab_size: 32, max_seq_len: 16,"
        " aux_loss_coef: 0}",
        "data.name=mqar", "data.args={num_examples: 41, seq_len: 16, num_kv_pairs: 2, vocab_size: 32}"]


def start(out, *sets, world=2):
    cmd = [sys.executable, str(WORKER), str(out), *sets]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(free_port()), *cmd[1:]]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(*procs):
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]


def params(run):
    return load_file(str(run / "params_rank0.safetensors"))


def eval_of(run):
    return ast.literal_eval((run / "eval_rank0.txt").read_text())


def test_fsdp_matches_one_process_loads_plain_and_resumes(tmp_path):
    fsdp, one, resumed = tmp_path / "fsdp", tmp_path / "one", tmp_path / "resumed"
    plain = "--no-extra-param"
    finish(start(fsdp, plain, *SETS, "train.batch_size=4", "train.fsdp=true"),
           start(one, plain, *SETS, "train.batch_size=8", world=1))
    shutil.copytree(fsdp, resumed)  # then cut it back to the mid-run checkpoint
    for name in ("checkpoints/step_00000004", "model.safetensors", "final.json", "params_rank0.safetensors"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    resume = start(resumed, plain, *SETS, "train.batch_size=4", "train.fsdp=true", "train.resume=true")

    # FSDP is a sharding, not another algorithm: = one process with the global batch
    a, b = params(fsdp), params(one)
    assert b.keys() <= a.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=k)
    assert torch.equal(a["lm_head.weight"], a["model.embed_tokens.weight"])  # still tied
    logs = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (fsdp, one)]
    for ra, rb in zip(*logs, strict=True):  # the clipped norm is the global one, not a shard's
        for k in ("loss", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= 1e-5 * rb[k], (ra["step"], k, ra[k], rb[k])
    ev_a, ev_b = eval_of(fsdp), eval_of(one)
    assert ev_a["n"] == ev_b["n"] == 41
    assert abs(ev_a["loss"] - ev_b["loss"]) < 1e-5 and ev_a["acc"] == ev_b["acc"]

    # what FSDP wrote is a plain run directory: load_run needs no process group
    model, _ = load_run(fsdp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, a[k]), k
    with safe_open(str(fsdp / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"model.embed_tokens.weight": "lm_head.weight"}  # tied: stored once, as save_model does
    step4 = load_file(str(fsdp / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(step4[k], a[k]) for k in step4)

    # resumed under FSDP from step 2: the uninterrupted run's parameters
    finish(resume)
    c = params(resumed)
    for k in a:
        assert torch.equal(a[k], c[k]), k
    assert (resumed / "metrics.jsonl").read_text().count("\n") == 4


def test_fsdp_gives_unused_parameters_zero_gradients(tmp_path):
    """A parameter no forward uses gets zero gradients (AdamW state with zero moments), as in one
    process, instead of none; and the run does not hang on it."""
    out = tmp_path / "run"
    finish(start(out, "train.steps=2", "train.fsdp=true", "train.batch_size=4", "train.log_every=1"))
    cfg = RunConfig.load(out / "config.yaml")
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **cfg.model.overrides)
    unused = torch.nn.Parameter(torch.ones(3))
    model.register_parameter("unused", unused)
    order = [p for g in build_optimizer(model, cfg.optim).param_groups for p in g["params"]]
    i = next(j for j, p in enumerate(order) if p is unused)
    state = load_file(str(out / "checkpoints" / "step_00000002" / "optimizer.safetensors"))
    assert state[f"{i}.step"].item() == 2
    assert torch.equal(state[f"{i}.exp_avg"], torch.zeros(3)) and torch.equal(state[f"{i}.exp_avg_sq"], torch.zeros(3))
    assert torch.equal(params(out)["unused"], torch.ones(3))
    assert max(state[f"{j}.exp_avg"].abs().max().item() for j in range(len(order)) if j != i) > 0  # others moved


def test_model_file_is_what_save_model_writes(tmp_path):
    """The gathered-state writer keeps the checkpoint format: for a plain module (tied weights) its
    file is byte for byte the one safetensors.torch.save_model writes."""
    torch.manual_seed(0)
    model = create_model("moh-llm-tiny-50", **DECODER)
    ckpt.save_weights(model, tmp_path / "ours.safetensors")
    save_model(model, str(tmp_path / "theirs.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    again = create_model("moh-llm-tiny-50", **DECODER)
    ckpt.load_weights(again, tmp_path / "theirs.safetensors")
    assert again.lm_head.weight is again.get_input_embeddings().weight
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
