"""Two gloo processes (torchrun): replicas stay identical, move from init, and match one process
with the same global batch."""
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from moh.models import create_model

from .conftest import REPO, SMOKE  # noqa: F401  (SMOKE: the config the worker trains)

WORKER = REPO / "tests" / "train" / "ddp_worker.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# optim.eps=1e-6: Adam divides by |g| + eps, which would magnify fp noise of near-zero gradients
SETS = ["train.steps=4", "train.save_every=2", "train.log_every=1", "optim.eps=1e-6"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    run([*torchrun, str(WORKER), str(ddp), *SETS, "train.batch_size=8"])
    run([sys.executable, str(WORKER), str(single), *SETS, "train.batch_size=16"])
    r0, r1 = (load_file(str(ddp / f"params_rank{r}.safetensors")) for r in (0, 1))
    one = load_file(str(single / "params_rank0.safetensors"))
    torch.manual_seed(0)
    init = dict(create_model("vit-tiny-mha", depth=2, dim=32, num_heads=4, image_size=8, num_classes=4).named_parameters())
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # replicas identical, bit for bit
        torch.testing.assert_close(r0[k], one[k], atol=2e-6, rtol=1e-5, msg=k)  # = one process, batch 2b
    assert torch.equal(r0["unused"], torch.ones(3))  # DDP coped with it; zero gradients left it at 1
    assert max((r0[k] - init[k]).abs().max().item() for k in init) > 1e-3  # training moved them
    assert {p.name for p in (ddp / "checkpoints" / "step_00000004").iterdir()} >= {"rng_0.json", "rng_1.json"}
    assert (ddp / "eval_rank0.txt").read_text() == (ddp / "eval_rank1.txt").read_text()
