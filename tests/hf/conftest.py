"""Shared fixtures of the transformers-model tests: a tiny MoH config, a tiny English-like corpus
with its BPE tokenizer and token files (the data pipeline's own functions), and a tiny trained run."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moh.hf import MoHLMConfig

WORDS = ("the a river city king queen stone light house garden water night morning letter ship road old new "
         "small great quiet bright dark cold warm green silver early walks sees finds keeps opens carries").split()


def tiny_config(**kw) -> MoHLMConfig:
    """2 layers x 32, 4 heads of width 8, 2 key/value heads; MoH-50 (1 shared + top-1 of 3)."""
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, num_shared=1, top_k=1)
    return MoHLMConfig(**{**base, **kw})


@pytest.fixture
def model():
    torch.manual_seed(0)
    from moh.hf import MoHForCausalLM

    return MoHForCausalLM(tiny_config()).eval()


def _docs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for k in range(n):
        sents = [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(5, 10)))).capitalize() + "."
                 for _ in range(int(rng.integers(4, 8)))]
        docs.append({"id": f"doc/{k}", "text": " ".join(sents), "source": "synthetic"})
    return docs


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """{"corpus", "tokenizer", "tokens"}: 60 synthetic documents, a 300-entry BPE, token files."""
    pytest.importorskip("tokenizers")
    from moh.data.text.corpus import open_corpus
    from moh.data.text.tokenizer import train_tokenizer
    from moh.data.text.tokens import tokenize_corpus

    root = tmp_path_factory.mktemp("hf-text")
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _docs(60)))
    (corpus_dir / "manifest.json").write_text(json.dumps({"name": "synthetic"}))
    corpus = open_corpus([corpus_dir])
    train_tokenizer(corpus, root / "tok", vocab_size=300)
    tokenize_corpus(corpus, root / "tok", root / "tokens")
    return {"corpus": corpus_dir, "tokenizer": root / "tok", "tokens": root / "tokens", "root": root}


def lm_run_config(out_dir: Path, tokens: Path, *sets: str):
    """A RunConfig training a tiny MoH-50 decoder on ``tokens`` (seq 32) for 6 steps."""
    from moh.train.config import RunConfig

    return RunConfig.load(None, [
        "model.name=moh-llm-tiny-50",
        "model.overrides={vocab_size: 300, dim: 32, depth: 2, num_heads: 4, num_shared: 1, top_k: 1, "
        "intermediate_size: 64, max_seq_len: 64, backend: sparse}",
        "data.name=text", f"data.args={{root: {tokens}, seq_len: 32}}", "optim.warmup_steps=1",
        "train.steps=6", "train.batch_size=4", "train.save_every=3", "train.keep_last=3", "train.log_every=1",
        "train.progress=false", "train.tensorboard=false", f"train.out_dir={out_dir}", *sets])


@pytest.fixture(scope="session")
def lm_run(text_data, tmp_path_factory):
    """A finished tiny language-model run directory (the engine, the text data set)."""
    from moh.train.engine import fit

    out = tmp_path_factory.mktemp("hf-run") / "run"
    torch.set_num_threads(1)
    fit(lm_run_config(out, text_data["tokens"]))
    return out
