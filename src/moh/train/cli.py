"""``moh train CONFIG.yaml [--set a.b=v ...] [--resume] [--out-dir DIR]``."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

CONFIG_DIR = Path("configs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML run config (see configs/); a bare name means configs/NAME.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.add_argument("--out-dir", help="run directory (overrides train.out_dir)")
    p.add_argument("--list-configs", action="store_true", help="list configs/*.yaml and exit")


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"config {name!r} not found; configs in {CONFIG_DIR}/: {known}")
    return path


def run(args: argparse.Namespace) -> int:
    if args.list_configs:
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
            print(f"{path.stem:24s} {first}")
        return 0
    if not args.config:
        raise ValueError("give a config file (moh train configs/smoke.yaml) or --list-configs")
    from moh.train.config import RunConfig
    from moh.train.engine import fit

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=true")
    if args.out_dir:
        overrides.append(f"train.out_dir={args.out_dir}")
    cfg = RunConfig.load(_config_path(args.config), overrides)
    from moh.train.distributed import shutdown

    result = fit(cfg)
    shutdown()  # under torchrun / accelerate launch: leave the process group together
    if int(os.environ.get("RANK", "0")) != 0:  # one summary
        return 0
    last = result.history[-1] if result.history else {}
    ev = result.eval
    print(f"model {cfg.model.name}  data {cfg.data.name}  steps {cfg.train.steps}  out {result.out_dir}")
    if last:
        print(f"train  loss {last['loss']:.4f}  acc {last['acc']:.4f}  {last['items_per_s']:.0f} items/s  "
              f"heads active {last['heads_active']:.3f}")
    print(f"eval   loss {ev['loss']:.4f}  acc {ev['acc']:.4f}  heads active {ev['heads_active']:.3f}  (n={ev['n']})")
    return 0
