"""``moh data list``, ``moh data fetch NAME [--root data]`` (obtain and verify raw data files; NAME
``english`` builds the offline English text corpus), and the text actions ``tokenizer``,
``tokenize``, ``tasks`` (``moh.data.text.cli``)."""
from __future__ import annotations

import argparse
import sys

from moh.data.text import cli as text_cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    sub.add_parser("list", help="the data sets and whether their files are present under --root").add_argument(
        "--root", default="data", help="data directory (default: data)"
    )
    f = sub.add_parser("fetch", help="copy or download a data set's raw files into ROOT/NAME and verify them")
    f.add_argument("name", help="data set name (see `moh data list`): fashion-mnist, mnist, cifar10, or english "
                                "(the offline English text corpus: Wikipedia sample, news, Shakespeare)")
    f.add_argument("--root", default="data", help="data directory (default: data)")
    f.add_argument("--timeout", type=float, default=30.0, help="seconds per download attempt (default: 30)")
    text_cli.add_fetch_options(f)
    text_cli.add_subcommands(sub)


def run(args: argparse.Namespace) -> int:
    from moh.data import DATASETS
    from moh.data.images import SOURCES, FetchError, fetch, find_file

    if args.data_command in text_cli.TEXT_ACTIONS:
        return _text(text_cli.run, args)
    if args.data_command == "fetch" and args.name in text_cli.CORPORA:
        return _text(text_cli.fetch, args)
    if args.data_command == "list":
        _import_providers()  # build_dataset imports providers lazily; list everything registered
        for name in DATASETS.names():
            if name in SOURCES:
                src = SOURCES[name]
                missing = [f.name for f in src.files if not _present(find_file, args.root, src, f.name)]
                state = "present" if not missing else f"missing {len(missing)}/{len(src.files)} files"
                print(f"{name:16s} {'x'.join(map(str, src.shape)):9s} {len(src.classes)} classes  {state} ({args.root}/{name})")
            elif name == "text":
                print(f"{name:16s} (token windows of moh data tokenize output; corpus: moh data fetch english)")
            else:
                print(f"{name:16s} (generated, no files)")
        for line in text_cli.list_lines(args.root):
            print(line)
        return 0
    import gzip
    import tarfile
    import zlib

    try:
        reports = fetch(args.name, args.root, timeout=args.timeout)
    except FetchError as e:  # offline / wrong content: one clear line, not a traceback
        print(f"moh data fetch: error: {e}", file=sys.stderr)
        return 1
    except (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError) as e:  # a truncated / damaged .gz or .tar.gz
        print(f"moh data fetch: error: {args.name}: a compressed file under {args.root}/{args.name} is damaged "
              f"({type(e).__name__}: {e}); delete it and run this command again", file=sys.stderr)
        return 1
    for r in reports:
        print(f"ok  {r.path}  {r.size} bytes  verified by {r.verified_by}  sha256 {r.sha256}  content sha256 {r.content_sha256}  ({r.origin})")
    return 0


def _text(action, args) -> int:
    from moh.data.images import FetchError

    try:
        return action(args)
    except FetchError as e:  # offline / wrong content: one clear line, not a traceback
        print(f"moh data {args.data_command}: error: {e}", file=sys.stderr)
        return 1


def _import_providers() -> None:
    import importlib

    from moh.data import _PROVIDERS

    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def _present(find_file, root, src, name: str) -> bool:
    try:
        find_file(root, src, name)
        return True
    except ValueError:
        return False
