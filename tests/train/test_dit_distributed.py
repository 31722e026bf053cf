"""A MoH-DiT under 2 gloo processes: DDP replicas identical, EMA included; FSDP2 ends where DDP ends."""
import sys

import pytest
import torch
from safetensors.torch import load_file

from .test_distributed import WORKER, free_port, run

DIT = ["model.name=moh-dit-tiny-90",
       "model.overrides={dim: 32, depth: 2, num_heads: 4, layer_heads: [[1, 2], [4, 0]], image_size: 8, "
       "patch_size: 2, num_classes: 4, ema_decay: 0.9}",
       "train.steps=4", "train.save_every=2", "train.log_every=1", "optim.eps=1e-6", "train.batch_size=8",
       "--no-extra-param"]


@pytest.mark.slow
def test_dit_ddp_replicas_and_fsdp_agree_with_the_ema(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run([*torchrun, "--master_port", str(free_port()), str(WORKER), str(tmp_path / "ddp"), *DIT])
    run([*torchrun, "--master_port", str(free_port()), str(WORKER), str(tmp_path / "fsdp"), *DIT, "train.fsdp=true"])
    r0, r1 = (load_file(str(tmp_path / "ddp" / f"params_rank{r}.safetensors")) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    ddp, fsdp = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() and int(ddp["ema.num_updates"]) == int(fsdp["ema.num_updates"]) == 4
    for k in ddp:  # same draws per rank (seed + rank), same maths: equal up to reduction order
        torch.testing.assert_close(fsdp[k], ddp[k], atol=2e-5, rtol=1e-4, msg=k)
    assert not torch.equal(ddp["ema.blocks__0__attn__q_proj__weight"], ddp["blocks.0.attn.q_proj.weight"])
