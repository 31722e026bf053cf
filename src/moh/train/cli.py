"""``moh train CONFIG [--set a.b=v ...] [--out DIR] [--resume | --overwrite] [--print-config]``.

CONFIG is a YAML file, or the name of a shipped config (``moh train smoke``: ``smoke.yaml`` of the
configs installed with the package, ``moh train --list-configs`` lists them). ``--resume`` needs
no CONFIG: ``moh train --resume --out runs/x`` continues the run with its own saved config."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# the configs shipped with the package (moh/configs; in a source checkout a link to configs/)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?",
                   help="YAML run config, or the name of a shipped one (see --list-configs); with --resume it may be "
                        "left out (the run's own config.yaml is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--out", metavar="DIR", help="run directory (overrides train.out_dir)")
    p.add_argument("--out-dir", dest="out", help=argparse.SUPPRESS)  # the old spelling
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in the run directory from its newest intact checkpoint; its saved "
                           "config decides, only train.steps / log_every / progress / num_workers / eval_every / "
                           "save_every / keep_last / metrics_csv / tensorboard may change")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in the run directory: its files are moved to DIR/.overwritten/ when this "
                           "run starts and deleted when it finishes")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")


def _config_path(name: str) -> Path:
    """A file path as given, else the shipped config NAME(.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.exists():
        raise ValueError(f"config {name!r} is a directory, not a YAML file")
    if len(path.parts) == 1:
        shipped = CONFIG_DIR / (name if path.suffix in (".yaml", ".yml") else f"{name}.yaml")
        if shipped.is_file():
            return shipped
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ValueError(f"config {name!r} not found (no such file, and no shipped config of that name); "
                     f"shipped configs ({CONFIG_DIR}): {known}")


def resolve(args: argparse.Namespace):
    """The RunConfig this command means (not yet checked against a run directory)."""
    from moh.train.config import RunConfig

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=true")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    if args.out:
        if not args.out.strip():
            raise ValueError("--out needs a directory path")
        overrides.append(f"train.out_dir={_yaml_str(args.out)}")
    if args.config:
        return RunConfig.load(_config_path(args.config), overrides)
    if not args.resume:
        raise ValueError("give a config file or the name of a shipped one (moh train smoke; moh train --list-configs), "
                         "or --resume --out RUN_DIR")
    if not args.out:
        raise ValueError("--resume without a config needs the run directory: moh train --resume --out RUN_DIR")
    saved = Path(args.out) / "config.yaml"
    if not saved.is_file():
        raise ValueError(f"--resume: {str(args.out)!r} holds no run to continue ({saved} is missing); "
                         f"give a config to start one")
    return RunConfig.load(saved, overrides)


def _yaml_str(text: str) -> str:
    """``text`` as a YAML scalar that reads back as the same string (a path like ``1e3`` or ``yes``)."""
    import yaml

    return yaml.safe_dump(text, default_style='"').strip().removesuffix("...").strip()


def run(args: argparse.Namespace) -> int:
    if args.list_configs:
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
            print(f"{path.stem:24s} {first}")
        return 0
    cfg = resolve(args)
    if args.print_config:
        import yaml

        from moh.train.rundir import to_save

        sys.stdout.write(yaml.safe_dump(to_save(cfg).to_dict(), sort_keys=False))
        return 0
    from moh.train.distributed import shutdown
    from moh.train.engine import fit

    result = fit(cfg)
    shutdown()  # under torchrun / accelerate launch: leave the process group together
    if int(os.environ.get("RANK", "0")) != 0:  # one summary
        return 0
    last = result.history[-1] if result.history else {}
    print(f"model {cfg.model.name}  data {cfg.data.name}  steps {cfg.train.steps}  out {result.out_dir}")
    if last:
        print("train  " + _numbers(last, ("loss", "acc", "heads_active")) + f"  {last.get('items_per_s', 0):.0f} items/s")
    print("eval   " + _numbers(result.eval, ("loss", "acc", "heads_active")) + f"  (n={result.eval.get('n', 0)})")
    return 0


def _numbers(rec: dict, keys) -> str:
    return "  ".join(f"{k.replace('_', ' ')} {rec[k]:.4f}" for k in keys if isinstance(rec.get(k), (int, float)))
