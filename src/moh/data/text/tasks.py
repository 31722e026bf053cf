"""lm-eval local tasks built from held-out text (no benchmark data set is reachable offline).

Two tasks, both made deterministically from the documents of one split (default ``heldout``: text
no model trained on, e.g. the Lee news test set of ``moh data fetch english``):

* ``<prefix>_cloze`` -- LAMBADA-style last-word prediction (``output_type: loglikelihood``,
  metrics ``acc``: the target is the greedy continuation, and ``perplexity``). Each sentence whose
  last word is alphabetic and (as in LAMBADA, where the word must be inferable from the passage)
  already occurs earlier in the passage gives one item: the passage up to that word is the
  context, ``" " + word`` the target. Contexts hold whole preceding sentences of the same
  document, at most ``max_context_chars`` characters (or ``max_context_tokens`` tokens).
* ``<prefix>_next_sentence`` -- which sentence comes next (``output_type: multiple_choice``,
  ``acc`` and ``acc_norm``): the true next sentence against 3 sentences from *other* documents of
  the split (of similar length when possible), in an order drawn from a generator seeded with
  (seed, item number).

Written to ``OUT``: ``cloze.jsonl``, ``next_sentence.jsonl`` (lm-eval reads them with
``dataset_path: json``), one YAML per task (``data_files`` as absolute paths, so the YAMLs run from
any directory; re-run this after moving ``OUT``), and ``tasks.json`` (counts, digests, settings).
Both tasks carry the tag ``<prefix>_heldout``. Run them with ``lm_eval --include_path OUT --tasks
<prefix>_heldout`` or ``lm_eval.simple_evaluate(..., task_manager=TaskManager(include_path=OUT))``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from moh.data.text._io import atomic_open, atomic_write_json, atomic_write_text, sha256_file
from moh.data.text.corpus import Corpus, Document, SplitRule, check_split

log = logging.getLogger(__name__)

NUM_CHOICES = 4
_ABBREVIATIONS = frozenset("""mr mrs ms dr prof st jr sr gen col lt sgt capt cmdr adm gov sen rep rev hon
    mt ft no vs etc inc co corp ltd dept univ approx est fig al e.g i.e u.s u.k u.n a.m p.m jan feb mar apr
    jun jul aug sep sept oct nov dec""".split())
_BOUNDARY = re.compile(r"(?<=[.!?])[\"'\u2019\u201d)\]]*\s+(?=[\"'\u2018\u201c(\[]?[A-Z0-9])")
_WORD = re.compile(r"^[A-Za-z]+$")
_TRAILING = ".,;:!?\"'\u2019\u201d)]"


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: cut after . ! ? (and closing quotes / brackets) before a capital or a
    digit, except after common abbreviations and single-letter initials. Newlines count as spaces."""
    flat = " ".join(text.split())
    out, start = [], 0
    for m in _BOUNDARY.finditer(flat):
        before = flat[start:m.start()].rsplit(" ", 1)[-1].rstrip(".!?\"')]").lower()
        if before in _ABBREVIATIONS or (len(before) == 1 and before.isalpha()):
            continue
        out.append(flat[start:m.end()].strip())
        start = m.end()
    tail = flat[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


@dataclass(frozen=True)
class TaskSettings:
    seed: int = 0
    prefix: str = "moh"
    max_context_chars: int = 2000
    max_context_tokens: int = 0  # 0: no token limit (needs a tokenizer otherwise)
    min_context_words: int = 12
    min_sentence_words: int = 4
    max_sentence_words: int = 60
    max_items: int = 0  # per task, 0 = all
    max_next_sentence_items: Optional[int] = None  # next-sentence items at most; None: max_items (each item costs 4 scorings)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.prefix):
            raise ValueError(f"prefix={self.prefix!r} must be a letter then letters, digits or _")
        for name in ("max_context_chars", "min_context_words", "min_sentence_words", "max_sentence_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_context_tokens < 0 or self.max_items < 0:
            raise ValueError(f"max_context_tokens={self.max_context_tokens} and max_items={self.max_items} must be >= 0")
        if self.max_next_sentence_items is not None and self.max_next_sentence_items < 0:
            raise ValueError(f"max_next_sentence_items={self.max_next_sentence_items} must be >= 0 (or None: max_items)")


def _fit_context(sentences: Sequence[str], partial: str, settings: TaskSettings,
                 count_tokens: Optional[Callable[[str], int]]) -> str:
    """The longest run of whole sentences ending right before ``partial`` (then ``partial``) within
    ``max_context_chars`` and, with ``count_tokens``, ``max_context_tokens``. Sentence counts are
    added up while growing (a join may add or save a token), then the result is counted exactly
    and trimmed from the left until it fits; ``""`` when even ``partial`` alone does not fit."""
    ctx, kept = partial, 0
    budget = settings.max_context_tokens - count_tokens(partial) if count_tokens else 0
    for s in reversed(sentences):
        longer = f"{s} {ctx}".strip()
        if len(longer) > settings.max_context_chars:
            break
        if count_tokens is not None:
            budget -= count_tokens(" " + s)
            if budget < 0:
                break
        ctx, kept = longer, kept + 1
    if count_tokens is None:
        return ctx
    first = len(sentences) - kept
    while count_tokens(ctx) > settings.max_context_tokens and first < len(sentences):
        first += 1
        ctx = " ".join([*sentences[first:], partial]).strip()
    return ctx if count_tokens(ctx) <= settings.max_context_tokens else ""


def cloze_items(docs: Sequence[Document], settings: TaskSettings,
                count_tokens: Optional[Callable[[str], int]] = None) -> list[dict]:
    items = []
    for doc in docs:
        sents = split_sentences(doc.text)
        for j, sent in enumerate(sents):
            words = sent.split(" ")
            target = words[-1].rstrip(_TRAILING)
            if len(words) < 2 or not _WORD.match(target) or len(target) < 2:
                continue
            ctx = _fit_context(sents[:j], " ".join(words[:-1]), settings, count_tokens)
            ctx_words = ctx.split()
            if len(ctx_words) < settings.min_context_words:
                continue
            if target.lower() not in {w.strip(_TRAILING + "(\"'").lower() for w in ctx_words}:
                continue  # LAMBADA's rule: the word must be recoverable from the passage
            items.append({"id": f"{doc.id}#{j}", "doc_id": doc.id, "context": ctx, "target": target})
    return items


def _item_rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _pick_distractors(rng: np.random.Generator, true: str, pool: Sequence[tuple[str, str]], doc_id: str) -> list[str]:
    """3 distinct sentences of other documents drawn from ``pool``; the first 100 draws accept only
    sentences within a factor 2 of ``true``'s length (so length alone gives little away)."""
    n, chosen = len(true.split()), []
    for attempt in range(400):
        d, s = pool[int(rng.integers(len(pool)))]
        if d == doc_id or s == true or s in chosen:
            continue
        if attempt < 100 and not n / 2 <= len(s.split()) <= 2 * n:
            continue
        chosen.append(s)
        if len(chosen) == NUM_CHOICES - 1:
            return chosen
    raise ValueError(f"the split has too few sentences outside document {doc_id!r} for {NUM_CHOICES - 1} distractors")


def next_sentence_items(docs: Sequence[Document], settings: TaskSettings,
                        count_tokens: Optional[Callable[[str], int]] = None) -> list[dict]:
    ok = lambda s: settings.min_sentence_words <= len(s.split()) <= settings.max_sentence_words  # noqa: E731
    per_doc = [(d.id, split_sentences(d.text)) for d in docs]
    pool = [(did, s) for did, sents in per_doc for s in sents if ok(s)]
    items = []
    for did, sents in per_doc:
        for j in range(1, len(sents)):
            if not ok(sents[j]):
                continue
            ctx = _fit_context(sents[:j - 1], sents[j - 1], settings, count_tokens)
            if len(ctx.split()) < settings.min_context_words:
                continue
            key = f"{did}#{j}"
            rng = _item_rng(settings.seed, key)
            choices = _pick_distractors(rng, sents[j], pool, did)
            label = int(rng.integers(NUM_CHOICES))
            choices.insert(label, sents[j])
            items.append({"id": key, "doc_id": did, "context": ctx, "choices": choices, "label": label})
    return items


def _subsample(items: list[dict], n: int, seed: int) -> list[dict]:
    """The first ``n`` items in the order of a seeded hash of their ids, back in document order."""
    if not n or len(items) <= n:
        return items
    keep = set(sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}\0{items[i]['id']}".encode()).digest())[:n])
    return [it for i, it in enumerate(items) if i in keep]


def _yaml(task: str, tag: str, data_file: Path, body: dict) -> str:
    import yaml

    cfg = {"task": task, "tag": [tag], "dataset_path": "json",
           "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}}, "test_split": "test", **body,
           "metadata": {"version": 1.0, "made_by": "moh data tasks"}}
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)


_CLOZE_BODY = {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{' ' + target}}",
               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                               {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]}
_NEXT_BODY = {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
              "doc_to_target": "{{label}}", "target_delimiter": " ",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def _write_jsonl(path: Path, items: list[dict]) -> None:
    import json

    with atomic_open(path, "w") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")


def _token_counter(tokenizer) -> Callable[[str], int]:
    """Number of tokens of a string (no special tokens), memoised: sentences recur across items."""
    @functools.lru_cache(maxsize=1 << 16)
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def build_tasks(corpus: Corpus, out_dir: str | Path, split: str = "heldout", rule: SplitRule = SplitRule(),
                settings: TaskSettings = TaskSettings(), tokenizer=None) -> dict:
    """Write the two tasks (see the module doc) from ``split`` of ``corpus``; returns tasks.json.
    ``tokenizer`` (a transformers tokenizer) is needed only for ``max_context_tokens``."""
    check_split(split)
    if settings.max_context_tokens and tokenizer is None:
        raise ValueError(f"max_context_tokens={settings.max_context_tokens} needs a tokenizer (--tokenizer DIR)")
    from moh.data.text._io import check_out_dir

    out_dir = check_out_dir(out_dir, "tasks output")
    docs = sorted(corpus.split(split, rule), key=lambda d: d.id)
    if len(docs) < 2:
        raise ValueError(f"the {split!r} split of the corpus has {len(docs)} documents; the tasks need at least 2 "
                         f"(a fetched corpus has a heldout split; for plain text pass --split validation)")
    count = _token_counter(tokenizer) if settings.max_context_tokens else None
    cloze = _subsample(cloze_items(docs, settings, count), settings.max_items, settings.seed)
    max_next = settings.max_items if settings.max_next_sentence_items is None else settings.max_next_sentence_items
    nexts = _subsample(next_sentence_items(docs, settings, count), max_next, settings.seed)
    if not cloze or not nexts:
        raise ValueError(f"the {split!r} split gave {len(cloze)} cloze and {len(nexts)} next-sentence items; "
                         f"it needs longer documents (or lower --min-context-words)")
    p, tag = settings.prefix, f"{settings.prefix}_heldout"
    files = {"cloze": out_dir / "cloze.jsonl", "next_sentence": out_dir / "next_sentence.jsonl"}
    _write_jsonl(files["cloze"], cloze)
    _write_jsonl(files["next_sentence"], nexts)
    atomic_write_text(out_dir / f"{p}_cloze.yaml", _yaml(f"{p}_cloze", tag, files["cloze"], _CLOZE_BODY))
    atomic_write_text(out_dir / f"{p}_next_sentence.yaml", _yaml(f"{p}_next_sentence", tag, files["next_sentence"], _NEXT_BODY))
    info = {"tasks": {f"{p}_cloze": {"items": len(cloze), "file": files["cloze"].name,
                                     "sha256": sha256_file(files["cloze"])},
                      f"{p}_next_sentence": {"items": len(nexts), "file": files["next_sentence"].name,
                                             "sha256": sha256_file(files["next_sentence"])}},
            "tag": tag, "split": split, "documents": len(docs), "split_rule": rule.to_dict(),
            "settings": settings.__dict__, "corpus": corpus.describe()}
    atomic_write_json(out_dir / "tasks.json", info)
    log.info("tasks: %d cloze, %d next-sentence items from %d %s documents -> %s", len(cloze), len(nexts), len(docs),
             split, out_dir)
    return info
