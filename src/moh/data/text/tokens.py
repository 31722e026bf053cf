"""Token files (tokenise once, nanoGPT style) and the packed-sequence data set ``text``.

``tokenize_corpus`` streams the documents of a corpus through a tokenizer and appends their ids to
one flat binary file per split, each document followed by the separator (the tokenizer's eos
token)::

    OUT/train.bin    ids of the train documents        doc0 EOS doc1 EOS ...
    OUT/val.bin      ids of the validation documents
    OUT/heldout.bin  ids of the held-out documents (only when the corpus has some)
    OUT/meta.json    format, dtype, vocab size, eos id, tokenizer sha256, per split: file,
                     tokens, documents, characters, sha256; the split rule; the corpus digests

The dtype is ``uint16`` when every id fits (vocab size <= 65536), else ``uint32``; files are raw
little-endian arrays (``np.memmap(path, dtype, mode="r")`` reads them). Documents are encoded in
batches of about ``batch_chars`` characters and written as they come, so memory stays bounded
whatever the corpus size. Files are written under temporary names and renamed at the end;
``meta.json`` is written last (an error on the way leaves an earlier run's files untouched).

``PackedText`` (registered as data set ``text``) cuts a token file into fixed windows: item ``i``
is ``tokens[i * stride : i * stride + seq_len]`` as ``{"input_ids": (seq_len,), "labels":
(seq_len,)}`` (int64, labels equal to the inputs: the decoder shifts them, position t predicts
t + 1). The default stride ``seq_len - 1`` overlaps windows by one token, so every token after the
first is a prediction target exactly once. An item depends only on ``i`` (no randomness), so the
trainer's resumable sampler replays batches exactly. Windows cross document boundaries (the EOS
token marks them), as in nanoGPT / GPT-2 training.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from moh.data import DATASETS
from moh.data.text._io import atomic_open, atomic_write_json, read_json, sha256_file
from moh.data.text.corpus import Corpus, SplitRule

log = logging.getLogger(__name__)

FORMAT = "moh-tokens-v1"
META_FILE = "meta.json"
SPLIT_FILES = {"train": "train.bin", "validation": "val.bin", "heldout": "heldout.bin"}
DTYPES = ("uint16", "uint32")
# data set split names (build_dataset passes "train" / "test") -> token file split
_DATASET_SPLITS = {"train": "train", "test": "validation", "validation": "validation", "val": "validation",
                   "heldout": "heldout"}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids ``0 .. vocab_size - 1``: uint16 up to 65536."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token files")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ------------------------------------------------------------------------------------------------
# Writing


class _SplitWriter:
    """Appends id arrays to one file under a temporary name, hashing and counting as it goes."""

    def __init__(self, stack: contextlib.ExitStack, path: Path, dtype: np.dtype):
        self.f = stack.enter_context(atomic_open(path, "wb"))
        self.dtype, self.sha = dtype, hashlib.sha256()
        self.tokens = self.documents = self.chars = 0

    def write(self, ids_per_doc: list[list[int]], chars: int, eos_id: int) -> None:
        lengths = np.fromiter((len(ids) + 1 for ids in ids_per_doc), dtype=np.int64, count=len(ids_per_doc))
        flat = np.empty(int(lengths.sum()), dtype=self.dtype)  # this batch only
        ends = np.cumsum(lengths)
        for ids, end, n in zip(ids_per_doc, ends, lengths):
            flat[end - n: end - 1] = ids
        flat[ends - 1] = eos_id
        data = flat.astype("<" + self.dtype.str[1:], copy=False).tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.tokens += flat.size
        self.documents += len(ids_per_doc)
        self.chars += chars

    def record(self, name: str) -> dict:
        return {"file": name, "tokens": self.tokens, "documents": self.documents, "chars": self.chars,
                "sha256": self.sha.hexdigest()}


def _resolve_separator(tok, separator: Optional[str]) -> tuple[str, int]:
    token = separator if separator is not None else tok.eos_token
    if token is None:
        raise ValueError("the tokenizer has no eos token; pass --separator TOKEN (a token of its vocabulary)")
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and token != tok.unk_token):
        raise ValueError(f"separator {token!r} is not a token of the tokenizer's vocabulary")
    return token, int(tid)


def _batches(docs: Iterable, rule: SplitRule, batch_chars: int):
    """(split, texts) batches of about ``batch_chars`` characters, per split, in corpus order."""
    pending = {s: ([], 0) for s in SPLIT_FILES}
    for doc in docs:
        split = rule.split_of(doc)
        texts, n = pending[split]
        texts.append(doc.text)
        n += len(doc.text)
        if n >= batch_chars:
            yield split, texts
            texts, n = [], 0
        pending[split] = (texts, n)
    for split, (texts, _) in pending.items():
        if texts:
            yield split, texts


def tokenize_corpus(corpus: Corpus, tokenizer_dir: str | Path, out_dir: str | Path, rule: SplitRule = SplitRule(),
                    separator: Optional[str] = None, batch_chars: int = 1 << 22) -> dict:
    """Write ``out_dir/{train,val,heldout}.bin`` and ``meta.json`` (see the module doc); returns meta."""
    from moh.data.text.tokenizer import load_tokenizer, tokenizer_digest

    from moh.data.text._io import check_out_dir

    out_dir = check_out_dir(out_dir, "token output")
    if batch_chars < 1:
        raise ValueError(f"batch_chars={batch_chars} must be >= 1")
    tok = load_tokenizer(tokenizer_dir)
    sep, eos_id = _resolve_separator(tok, separator)
    vocab, dtype = len(tok), token_dtype(len(tok))
    backend = tok.backend_tokenizer
    docs = corpus.documents()
    first = next(docs, None)  # opens the inputs (e.g. a Hugging Face dataset) before anything is written
    if first is None:
        raise ValueError(f"the corpus {[i.path for i in corpus.inputs]} has no documents")
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, _SplitWriter] = {}
    with contextlib.ExitStack() as stack:
        for split, texts in _batches(itertools.chain([first], docs), rule, batch_chars):
            if split not in writers:
                writers[split] = _SplitWriter(stack, out_dir / SPLIT_FILES[split], dtype)
            ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
            writers[split].write(ids, sum(map(len, texts)), eos_id)
        for split in ("train", "validation"):
            if split not in writers:  # an empty split still gets its (empty) file
                writers[split] = _SplitWriter(stack, out_dir / SPLIT_FILES[split], dtype)
        if writers["train"].tokens == 0:
            raise ValueError(f"the corpus {corpus.describe()} has no train documents under {rule.to_dict()}")
        # up to here a failure leaves an earlier run's files as they were; from here the new files
        # replace them (on leaving the block), and the old meta.json must never describe them
        (out_dir / META_FILE).unlink(missing_ok=True)
    if "heldout" not in writers:
        (out_dir / SPLIT_FILES["heldout"]).unlink(missing_ok=True)
    meta = {"format": FORMAT, "dtype": dtype.name, "byte_order": "little", "vocab_size": vocab, "eos_id": eos_id,
            "separator": sep, "separator_placement": "after every document",
            "tokenizer": {"path": str(Path(tokenizer_dir).resolve()), "sha256": tokenizer_digest(tokenizer_dir)},
            "splits": {s: w.record(SPLIT_FILES[s]) for s, w in sorted(writers.items())},
            "split_rule": rule.to_dict(), "corpus": corpus.describe()}
    atomic_write_json(out_dir / META_FILE, meta)
    log.info("tokens: %s -> %s", {s: r["tokens"] for s, r in meta["splits"].items()}, out_dir)
    return meta


# ------------------------------------------------------------------------------------------------
# Reading


def _missing(root: Path, what: str) -> ValueError:
    return ValueError(f"{what} in token directory {str(root)!r}; make the token files with: "
                      f"moh data tokenize --corpus CORPUS --tokenizer TOKENIZER_DIR --out {root}")


def read_meta(root: str | Path) -> dict:
    root = Path(root)
    if not (root / META_FILE).is_file():
        raise _missing(root, f"no {META_FILE}")
    meta = read_json(root / META_FILE, "token meta")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{root / META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"{root / META_FILE}: dtype {meta.get('dtype')!r}; valid choices: {list(DTYPES)}")
    return meta


def check_token_file(root: Path, meta: dict, split: str, verify: bool = True) -> tuple[Path, int]:
    """(path, number of tokens) of a split, after checking its size (and sha256 when ``verify``)."""
    if split not in meta["splits"]:
        raise _missing(root, f"no {split!r} split (meta.json has {sorted(meta['splits'])})")
    rec = meta["splits"][split]
    path = root / rec["file"]
    if not path.is_file():
        raise _missing(root, f"{rec['file']} is missing")
    itemsize = np.dtype(meta["dtype"]).itemsize
    size = path.stat().st_size
    if size != rec["tokens"] * itemsize:
        raise ValueError(f"{path}: {size} bytes, but meta.json says {rec['tokens']} {meta['dtype']} tokens "
                         f"({rec['tokens'] * itemsize} bytes); re-run moh data tokenize")
    if verify:
        got = sha256_file(path)
        if got != rec["sha256"]:
            raise ValueError(f"{path}: sha256 {got}, but meta.json says {rec['sha256']}; re-run moh data tokenize")
    return path, rec["tokens"]


@DATASETS.register("text")
class PackedText(Dataset):
    """Fixed token windows of one split of a token directory (see the module doc).

    Args: ``split`` "train" or "test" (= the validation split; "validation" and "heldout" work
    too), ``root`` the token directory, ``seq_len`` tokens per item, ``stride`` tokens between
    window starts (default ``seq_len - 1``), ``limit`` keep only the first N windows (0 = all),
    ``verify`` check the file's sha256 against meta.json (its size is always checked),
    ``tokenizer`` a tokenizer directory that must be the one the tokens were made with."""

    def __init__(self, split: str = "train", root: str = "data/english/tokens", seq_len: int = 256,
                 stride: Optional[int] = None, limit: int = 0, verify: bool = True, tokenizer: Optional[str] = None):
        if split not in _DATASET_SPLITS:
            raise ValueError(f"split={split!r}; valid choices: {sorted(_DATASET_SPLITS)}")
        stride = seq_len - 1 if stride is None else stride
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len={seq_len!r} must be an integer >= 2")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride={stride!r} must be an integer >= 1")
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit={limit!r} must be an integer >= 0")
        self.root, self.split = Path(root), _DATASET_SPLITS[split]
        self.meta = read_meta(self.root)
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        self.path, self.num_tokens = check_token_file(self.root, self.meta, self.split, verify)
        if seq_len > self.num_tokens:
            raise ValueError(f"seq_len={seq_len} exceeds the {self.num_tokens} tokens of the {self.split!r} split in "
                             f"{str(self.root)!r}")
        self.seq_len, self.stride, self.dtype = seq_len, stride, np.dtype(self.meta["dtype"])
        windows = (self.num_tokens - seq_len) // stride + 1
        self.length = min(windows, limit) if limit else windows
        self._tokens: Optional[np.memmap] = None  # opened on first use, in each worker process

    def _check_tokenizer(self, tokenizer: str) -> None:
        from moh.data.text.tokenizer import tokenizer_digest

        got, want = tokenizer_digest(tokenizer), self.meta["tokenizer"]["sha256"]
        if got != want:
            raise ValueError(f"tokenizer {tokenizer!r} (sha256 {got}) is not the one the tokens in {str(self.root)!r} "
                             f"were made with (sha256 {want})")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def __len__(self) -> int:
        return self.length

    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype.newbyteorder("<"), mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} windows")
        start = index * self.stride
        ids_T = torch.from_numpy(self.tokens()[start: start + self.seq_len].astype(np.int64))
        return {"input_ids": ids_T, "labels": ids_T.clone()}

    def __getstate__(self) -> dict:  # DataLoader workers open their own memmap
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state


def describe_tokens(root: str | Path) -> str:
    meta = read_meta(root)
    parts = [f"{s}: {r['tokens']} tokens, {r['documents']} documents" for s, r in meta["splits"].items()]
    return f"{root} ({meta['dtype']}, vocab {meta['vocab_size']}): " + "; ".join(parts)
