"""Run by tests/train/test_distributed.py and test_fsdp.py under torchrun (or alone): fit a tiny
model and write its final parameters to <out>/params_rank<r>.safetensors (under FSDP only rank 0
writes them, gathered whole).

    ddp_worker.py OUT [--no-extra-param] [a.b=v ...]

Without --no-extra-param the model gets a parameter no forward uses (DDP and FSDP must cope with
it); with it the run directory is a plain one that ``load_run`` reads."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moh.models import create_model
from moh.train.config import RunConfig
from moh.train.distributed import gather_full_state, is_sharded, shutdown
from moh.train.engine import fit


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    extra_param = "--no-extra-param" not in overrides
    overrides = [o for o in overrides if o != "--no-extra-param"]
    torch.set_num_threads(1)
    cfg = RunConfig.load(Path(__file__).parents[2] / "configs" / "smoke.yaml", [f"train.out_dir={out}", *overrides])
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, **cfg.model.overrides)
    if extra_param:  # zero gradients keep it at 1 under AdamW (no weight decay on 1-D tensors)
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
    result = fit(cfg, model=model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if is_sharded(result.model):
        params, _ = gather_full_state(result.model)  # every process takes part; rank 0 gets them
    else:
        params = {k: v.detach().clone().contiguous() for k, v in result.model.named_parameters()}
    if params:
        save_file(params, str(out / f"params_rank{rank}.safetensors"))
    (out / f"eval_rank{rank}.txt").write_text(repr(result.eval))
    shutdown()


if __name__ == "__main__":
    main()
