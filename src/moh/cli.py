"""The ``moh`` command: a thin dispatcher. Each subcommand lives in the module that implements it,
as ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("moh.demo", "the main job: train MHA vs MoH on in-context recall, print a table"),
    "bench": ("moh.eval.bench", "latency / memory of the backends versus SDPA multi-head attention"),
    "train": ("moh.train.cli", "train from a YAML config: moh train configs/x.yaml --set optim.lr=3e-4"),
    "eval": ("moh.eval.classify", "score a trained run: top-1 (classifiers), perplexity and lm-eval tasks (language models), domain FID (DiT)"),
    "generate": ("moh.eval.generate", "text from a trained language model, streamed: moh generate RUN_DIR --prompt \"...\""),
    "sample": ("moh.eval.sample", "PNG sample grids of a trained DiT run: moh sample RUN_DIR --classes 0,1 --cfg-scale 4"),
    "data": ("moh.data.cli", "fetch and verify data sets: moh data fetch fashion-mnist"),
    "analyze": ("moh.analysis.cli", "head-load pictures of a trained model (paper Fig. 8)"),
    "models": ("moh.models.cli", "list the model presets"),
    "convert": ("moh.convert.cli", "a pretrained LLaMA / Mistral / Qwen2 (dir, GGUF, hub id) -> a moh model: moh convert SRC OUT --heads 75%%"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments (others stay lazy)."""
    parser = argparse.ArgumentParser(prog="moh", description="Mixture-of-Head attention (arXiv 2410.11842)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"moh {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_.replace("%%", "%"))
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


# commands whose --out is an output file / directory: checked before the work, not after it
OUT_KIND = {"bench": "file", "eval": "file", "analyze": "dir", "demo": "dir", "sample": "dir"}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moh-attention")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        _check_out(args)
        code = int(importlib.import_module(args._module).run(args) or 0)
        sys.stdout.flush()  # here, so a reader that left (| head) is caught below, not at exit
        return code
    except ValueError as e:  # bad input: one clear message, no traceback
        return _error(args, e, 2)
    except BrokenPipeError:  # `moh models | head`: the reader left; stop quietly
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except OSError as e:  # a path the user gave: missing, a directory, read-only, disk full, ...
        return _error(args, _os_message(e), 2)
    except FloatingPointError as e:  # training diverged (loss nan / inf): say so, no traceback
        return _error(args, f"{e} (lower optim.lr, or check the data)", 1)
    except KeyboardInterrupt:
        print(f"moh {args.command}: interrupted", file=sys.stderr)
        return 130


def _check_out(args: argparse.Namespace) -> None:
    out, kind = getattr(args, "out", None), OUT_KIND.get(args.command)
    if isinstance(out, str) and not out.strip():  # "" would silently mean the default (or the current directory)
        flag = "OUT" if args.command == "convert" else "--out"  # convert's OUT is positional
        raise ValueError(f"{flag} {out!r} is empty; give a path" + ("" if flag == "OUT" else
                                                                     ", or leave --out out for the default"))
    if not out or kind is None:
        return
    from moh.train.rundir import check_writable_dir, check_writable_file

    (check_writable_file if kind == "file" else check_writable_dir)(out, "--out")


def _error(args: argparse.Namespace, message, code: int) -> int:
    try:
        print(f"moh {args.command}: error: {message}", file=sys.stderr)
    except BrokenPipeError:
        pass
    return code


def _os_message(e: OSError) -> str:
    """``[Errno 13] Permission denied: 'x'`` as ``'x': permission denied``."""
    where = " -> ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
    what = (e.strerror or str(e)).lower() if e.strerror else str(e)
    return f"{where}: {what}" if where else what


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
