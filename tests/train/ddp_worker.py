"""Run by tests/train/test_distributed.py under torchrun: fit a tiny model and write this rank's
final parameters to <out>/params_rank<r>.safetensors."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moh.models import create_model
from moh.train.config import RunConfig
from moh.train.engine import fit


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    cfg = RunConfig.load(Path(__file__).parents[2] / "configs" / "smoke.yaml", [f"train.out_dir={out}", *overrides])
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, **cfg.model.overrides)
    # a parameter no forward uses: DDP must cope with it (its gradient is zero, not missing)
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
    result = fit(cfg, model=model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    params = {k: v.detach().clone().contiguous() for k, v in result.model.named_parameters()}
    save_file(params, str(out / f"params_rank{rank}.safetensors"))
    (out / f"eval_rank{rank}.txt").write_text(repr(result.eval))


if __name__ == "__main__":
    main()
