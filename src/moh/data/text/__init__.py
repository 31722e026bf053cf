"""Real English text for MoH language models: corpus (fetch, split by document), BPE tokenizer,
memory-mapped token files and the packed-sequence data set ``text``, lm-eval tasks from held-out
text. Heavy dependencies (tokenizers, transformers, datasets, lm_eval) are imported only by the
functions that need them; the names below are imported on first use.

Pipeline (each step a ``moh data`` command)::

    fetch english  -> data/english/{docs.jsonl, manifest.json}                 english.py, corpus.py
    tokenizer      -> TOKENIZER_DIR/{tokenizer.json, tokenizer_config.json,    tokenizer.py
                      moh_tokenizer.json}
    tokenize       -> TOKENS_DIR/{train.bin, val.bin, heldout.bin, meta.json}  tokens.py (data set "text")
    tasks          -> TASKS_DIR/{cloze.jsonl, next_sentence.jsonl, *.yaml,     tasks.py (lm-eval)
                      tasks.json}
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Document": "corpus", "SplitRule": "corpus", "open_corpus": "corpus",
    "fetch_english": "english",
    "train_tokenizer": "tokenizer", "export_pretrained": "tokenizer", "load_tokenizer": "tokenizer",
    "tokenize_corpus": "tokens", "PackedText": "tokens", "token_dtype": "tokens",
    "build_tasks": "tasks", "TaskSettings": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moh.data.text' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moh.data.text.{_EXPORTS[name]}"), name)
