"""Documents, the corpus inputs moh reads, and the train / validation split rule.

A document is ``Document(id, text, source, title, heldout)``. The inputs ``open_corpus`` accepts:

* a corpus directory, i.e. what ``moh data fetch english`` writes: ``docs.jsonl`` (one JSON object
  per line: ``{"id", "source", "title", "heldout", "text"}``) next to ``manifest.json``;
* ``.jsonl`` files: one JSON object per line with a ``text`` field (``id`` optional, default
  ``<file>:<line>``; ``heldout`` optional, default false);
* plain text files (``.txt``, ``.md``, ``.rst``, optionally ``.gz``; UTF-8): one document per file,
  or per blank-line separated paragraph / per line with ``docs_per``; ids are ``<file>``,
  ``<file>#<paragraph>``, ``<file>:<line>``;
* a folder: every such file below it, in sorted order;
* ``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face dataset (streamed; needs the network), one
  document per row, ids ``NAME/<row>``.

The split rule (``SplitRule``) is a pure function of the document id, so it is the same on every
machine and for every input order: ``u = int(sha256(salt + "\\0" + id)[:8 bytes]) / 2**64``;
the document is in ``validation`` when ``u < val_fraction``, else in ``train``. Documents marked
``heldout`` (a whole source kept for evaluation text, e.g. the Lee news test set) are in neither.
A document is never cut across splits, so no text is in two splits (unless the input itself holds
the same text twice under two ids; ``moh data fetch`` removes exact duplicates).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from moh.data.images import FetchError
from moh.data.text._io import sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "heldout")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
DOCS_PER = ("file", "paragraph", "line")
DOCS_FILE, MANIFEST_FILE = "docs.jsonl", "manifest.json"


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str = ""
    title: str = ""
    heldout: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class SplitRule:
    """Document id -> "train" | "validation" (held-out documents -> "heldout"); see the module doc."""

    val_fraction: float = 0.1
    salt: str = "moh-split-v1"

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")

    def unit(self, doc_id: str) -> float:
        """The id's position in [0, 1): the first 8 bytes of sha256(salt NUL id), big-endian."""
        digest = hashlib.sha256(f"{self.salt}\0{doc_id}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def split_of(self, doc: Document) -> str:
        if doc.heldout:
            return "heldout"
        return "validation" if self.unit(doc.id) < self.val_fraction else "train"

    def to_dict(self) -> dict:
        return {"val_fraction": self.val_fraction, "salt": self.salt,
                "rule": "validation if int.from_bytes(sha256((salt + '\\0' + id).encode())[:8], 'big') / 2**64 "
                        "< val_fraction else train; heldout documents stay heldout"}


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid choices: {list(SPLITS)}")
    return split


# ------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Input:
    kind: str  # "corpus" (a fetched corpus dir), "jsonl", "text", "hf"
    path: str  # file / directory path, or the dataset name for "hf"
    files: tuple = ()  # text / jsonl files (sorted) for folders; the docs.jsonl for "corpus"
    config: Optional[str] = None  # Hugging Face dataset config


class Corpus:
    """One or more inputs read as a stream of documents (nothing is held in memory at once)."""

    def __init__(self, inputs: Sequence[Input], docs_per: str = "file", text_field: str = "text",
                 hf_split: str = "train"):
        self.inputs, self.docs_per, self.text_field, self.hf_split = tuple(inputs), docs_per, text_field, hf_split

    def documents(self) -> Iterator[Document]:
        for inp in self.inputs:
            yield from _read_input(inp, self.docs_per, self.text_field, self.hf_split)

    def split(self, split: str, rule: SplitRule) -> Iterator[Document]:
        """The documents of one split, in input order."""
        check_split(split)
        return (d for d in self.documents() if rule.split_of(d) == split)

    def describe(self) -> list[dict]:
        """Where the documents come from, with digests (for meta.json / the tokenizer's record)."""
        return [_describe(inp) for inp in self.inputs]


def open_corpus(paths: Sequence[str | Path], docs_per: str = "file", text_field: str = "text",
                hf_split: str = "train") -> Corpus:
    """Check every input exists and is readable as documents; ValueError naming the first bad one."""
    if docs_per not in DOCS_PER:
        raise ValueError(f"docs_per={docs_per!r}; valid choices: {list(DOCS_PER)}")
    if not paths:
        raise ValueError("no corpus given: pass a fetched corpus directory, text files, a folder or hf:NAME")
    return Corpus([_classify(str(p)) for p in paths], docs_per, text_field, hf_split)


def _classify(p: str) -> Input:
    if p.startswith("hf:"):
        name, _, config = p[3:].partition(":")
        if not name:
            raise ValueError(f"corpus {p!r}: give a dataset name after 'hf:', e.g. hf:wikitext:wikitext-103-raw-v1")
        return Input("hf", name, config=config or None)
    path = Path(p)
    if path.is_dir():
        if (path / DOCS_FILE).is_file() and (path / MANIFEST_FILE).is_file():
            return Input("corpus", str(path), files=(str(path / DOCS_FILE),))
        files = tuple(sorted(str(f) for f in path.rglob("*") if f.is_file() and _text_kind(f)))
        if not files:
            raise ValueError(f"corpus folder {p!r} holds no {'/'.join(TEXT_SUFFIXES)}/.jsonl files (optionally .gz)")
        return Input("folder", str(path), files=files)
    if path.is_file():
        kind = _text_kind(path)
        if kind is None:
            raise ValueError(f"corpus file {p!r}: unknown kind; expected {'/'.join(TEXT_SUFFIXES)} or .jsonl (optionally .gz)")
        return Input(kind, str(path), files=(str(path),))
    raise ValueError(f"corpus {p!r} does not exist (expected a corpus directory, a text file, a folder or hf:NAME)")


def _text_kind(path: Path) -> Optional[str]:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _open_text(path: str) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline=None)


def _read_input(inp: Input, docs_per: str, text_field: str, hf_split: str) -> Iterator[Document]:
    if inp.kind == "hf":
        yield from _read_hf(inp.path, inp.config, hf_split, text_field)
        return
    base = Path(inp.path) if inp.kind == "folder" else None
    for f in inp.files:
        label = os.path.relpath(f, base) if base is not None else Path(f).name
        try:
            if inp.kind == "corpus" or _text_kind(Path(f)) == "jsonl":
                yield from _read_jsonl(f, label, text_field)
            else:
                yield from _read_text(f, label, docs_per)
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {f!r} is not UTF-8 ({e.reason} at byte {e.start}); convert it first") from None


def _read_jsonl(path: str, label: str, text_field: str) -> Iterator[Document]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path!r} line {lineno} is not JSON: {e}") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ValueError(f"{path!r} line {lineno} has no string field {text_field!r}")
            yield Document(str(row.get("id", f"{label}:{lineno}")), row[text_field], str(row.get("source", "")),
                           str(row.get("title", "")), bool(row.get("heldout", False)))


def _read_text(path: str, label: str, docs_per: str) -> Iterator[Document]:
    with _open_text(path) as f:
        if docs_per == "file":
            text = f.read().strip()
            if text:
                yield Document(label, text, source=label)
        elif docs_per == "line":
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield Document(f"{label}:{lineno}", line.strip(), source=label)
        else:
            yield from (Document(f"{label}#{k}", t, source=label) for k, t in enumerate(_paragraphs(f)))


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blank-line separated blocks, streamed."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block).strip()
            block = []
    if block:
        yield "\n".join(block).strip()


def _read_hf(name: str, config: Optional[str], split: str, text_field: str) -> Iterator[Document]:
    for k, row in enumerate(load_hf_rows(name, config, split)):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"Hugging Face dataset {name!r} row {k} has no string field {text_field!r} "
                             f"(fields: {sorted(row)}); pass --text-field")
        if text.strip():
            yield Document(f"{name}/{k}", text, source=f"hf:{name}")


def load_hf_rows(name: str, config: Optional[str], split: str):
    """``datasets.load_dataset(name, config, split=split, streaming=True)``; FetchError naming the
    dataset when offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the Hub unreachable)."""
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
    need = f"Hugging Face dataset {name!r} (split {split!r}) needs the network to download"
    if offline:
        raise FetchError(f"{need}, but {' and '.join(offline)} is set; unset it when online, or pass local text "
                         f"files / a fetched corpus (moh data fetch english) instead")
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except ConnectionError as e:  # what datasets raises when the Hub cannot be reached
        raise FetchError(f"{need}, and the Hub could not be reached ({e})") from None


def _describe(inp: Input) -> dict:
    if inp.kind == "hf":
        return {"kind": "hf", "name": inp.path, "config": inp.config}
    if inp.kind == "corpus":
        manifest = json.loads((Path(inp.path) / MANIFEST_FILE).read_text(encoding="utf-8"))
        return {"kind": "corpus", "path": str(Path(inp.path).resolve()), "name": manifest.get("name"),
                "docs_sha256": sha256_file(inp.files[0]), "archives": manifest.get("archives", [])}
    digests = [(os.path.relpath(f, inp.path) if inp.kind == "folder" else Path(f).name, sha256_file(f)) for f in inp.files]
    combined = hashlib.sha256("".join(f"{d}  {n}\n" for n, d in digests).encode()).hexdigest()
    out = {"kind": inp.kind, "path": str(Path(inp.path).resolve()), "files": len(digests), "sha256": combined}
    if len(digests) <= 64:
        out["file_sha256"] = dict(digests)
    return out
