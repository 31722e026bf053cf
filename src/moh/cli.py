"""The ``moh`` command: a thin dispatcher. Each subcommand lives in the module that implements it,
as ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("moh.demo", "the main job: train MHA vs MoH on in-context recall, print a table"),
    "bench": ("moh.eval.bench", "latency / memory of the backends versus SDPA multi-head attention"),
    "train": ("moh.train.cli", "train from a YAML config: moh train configs/x.yaml --set optim.lr=3e-4"),
    "eval": ("moh.eval.classify", "top-1 accuracy of a trained checkpoint on a test split (DiT runs: domain FID)"),
    "sample": ("moh.eval.sample", "PNG sample grids of a trained DiT run: moh sample RUN_DIR --classes 0,1 --cfg-scale 4"),
    "data": ("moh.data.cli", "fetch and verify data sets: moh data fetch fashion-mnist"),
    "analyze": ("moh.analysis.cli", "head-load pictures of a trained model (paper Fig. 8)"),
    "models": ("moh.models.cli", "list the model presets"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments (others stay lazy)."""
    parser = argparse.ArgumentParser(prog="moh", description="Mixture-of-Head attention (arXiv 2410.11842)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ValueError as e:  # bad input: one clear message, no traceback
        print(f"moh {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
