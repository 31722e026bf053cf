"""Image classification data sets read from their standard raw files, and the fetch step.

Registered names: ``fashion-mnist``, ``mnist`` (IDX files) and ``cifar10`` (the *binary* version,
``cifar-10-batches-bin/*.bin``; the pickle version is never read). Each split is held in memory as
one uint8 tensor (N, C, H, W); ``__getitem__`` returns ``{"images": float (C, H, W) normalised,
"labels": long ()}``. Training augmentation (random crop with zero padding, horizontal flip) uses
the global torch RNG, so a seeded trainer replays it exactly.

Files are looked up in ``root/<name>/`` (what ``moh data fetch`` writes), then in ``root`` itself
(so ``root`` may point straight at a directory of raw files, e.g. the Debian package's).
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from moh.data import DATASETS

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A data set's raw files could not be obtained (missing, offline, or wrong content)."""


class ChecksumError(FetchError):
    """A file's size or checksum differs from the official one; the message names the file."""


# ------------------------------------------------------------------------------------------------
# What each data set is: files, official checksums, sources, normalisation, augmentation


@dataclass(frozen=True)
class RawFile:
    name: str  # path relative to the data set's directory
    md5: str  # official md5 of the file as distributed ('' when none is published)
    content_md5: str = ""  # md5 of the decompressed bytes of a .gz file (survives re-compression)
    size: int = 0  # bytes of the (decompressed) content; 0 = not checked


@dataclass(frozen=True)
class ImageSource:
    name: str
    shape: tuple  # (C, H, W)
    mean: tuple  # per channel, pixels in [0, 1]
    std: tuple
    pad: int  # random-crop zero padding for training (pixels)
    flip: bool  # random horizontal flip for training
    classes: tuple
    splits: dict  # split -> (images file, labels file) for IDX, or tuple of .bin files for CIFAR
    files: tuple  # RawFile, everything fetch must produce
    urls: tuple = ()  # base URLs (official first); a file is downloaded from base + file name
    archive: Optional[RawFile] = None  # one downloaded archive holding ``files`` (CIFAR-10)
    local_dirs: tuple = ()  # directories that may already hold the files (offline installs)
    offline_hint: str = ""  # what to do when the files are missing and the network is down
    kind: str = "idx"  # "idx" or "cifar-bin"


def _idx_files(images_train: tuple, labels_train: tuple, images_test: tuple, labels_test: tuple) -> tuple:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    sizes = (16 + 60000 * 784, 8 + 60000, 16 + 10000 * 784, 8 + 10000)
    sums = (images_train, labels_train, images_test, labels_test)
    return tuple(RawFile(n, md5, cmd5, size) for n, (md5, cmd5), size in zip(names, sums, sizes))


_IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_TRAIN = tuple(f"{_CIFAR_DIR}/data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = (f"{_CIFAR_DIR}/test_batch.bin",)

# Official md5s of the .gz files (as published with each data set) and of their decompressed
# content; the Debian package re-compresses the files, so only the content md5 can match there.
SOURCES: dict[str, ImageSource] = {
    "fashion-mnist": ImageSource(
        name="fashion-mnist",
        shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        pad=2,
        flip=True,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        splits=_IDX_SPLITS,
        files=_idx_files(
            ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
            ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
            ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
        ),
        urls=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        local_dirs=("/usr/share/datasets/fashion-mnist",),
        offline_hint="Offline, install the Debian package with: apt-get update && apt-get install -y dataset-fashion-mnist "
        "(files in /usr/share/datasets/fashion-mnist), then run this command again",
    ),
    "mnist": ImageSource(
        name="mnist",
        shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        pad=2,
        flip=False,  # flipped digits are other digits
        classes=tuple(str(i) for i in range(10)),
        splits=_IDX_SPLITS,
        files=_idx_files(
            ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
            ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
            ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
            ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
        ),
        urls=("https://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        offline_hint="Offline, copy the four official MNIST .gz files into {dir} by hand",
    ),
    "cifar10": ImageSource(
        name="cifar10",
        shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        pad=4,
        flip=True,
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        splits={"train": _CIFAR_TRAIN, "test": _CIFAR_TEST},
        files=tuple(RawFile(n, "", size=10000 * 3073) for n in _CIFAR_TRAIN + _CIFAR_TEST),
        urls=("https://www.cs.toronto.edu/~kriz/",),
        archive=RawFile("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
        offline_hint="Offline, copy the official cifar-10-binary.tar.gz (the binary version) into {dir} by hand",
        kind="cifar-bin",
    ),
}


def get_source(name: str) -> ImageSource:
    if name not in SOURCES:
        raise ValueError(f"unknown image data set {name!r}; valid choices: {sorted(SOURCES)}")
    return SOURCES[name]


# ------------------------------------------------------------------------------------------------
# Raw file readers


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) -> uint8 array of the shape in its header.
    Header: 2 zero bytes, type code (0x08 = ubyte), number of dims, then big-endian int32 dims."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4].hex()})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type code 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim  # 16 for images (3 dims), 8 for labels (1 dim)
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def read_cifar_bin(paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary batches -> images uint8 (N, 3, 32, 32), labels uint8 (N,).
    Each record is 1 label byte then 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major)."""
    images, labels = [], []
    for p in paths:
        data = np.frombuffer(_read_bytes(Path(p)), dtype=np.uint8)
        if data.size % 3073:
            raise ValueError(f"{p}: {data.size} bytes is not a whole number of 3073-byte CIFAR records")
        rec = data.reshape(-1, 3073)
        labels.append(rec[:, 0])
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def find_file(root: str | Path, source: ImageSource, name: str) -> Path:
    """``name`` (or its decompressed form) in ``root/<data set>/`` or ``root``; ValueError if absent."""
    root = Path(root)
    plain = name[:-3] if name.endswith(".gz") else name
    for base in (root / source.name, root):
        for candidate in (base / name, base / plain):
            if candidate.is_file():
                return candidate
    raise ValueError(
        f"{source.name}: file {name!r} not found in {str(root / source.name)!r} or {str(root)!r}; "
        f"run: moh data fetch {source.name} --root {root}"
    )


def load_split(source: ImageSource, split: str, root: str | Path) -> tuple[Tensor, Tensor]:
    """(images uint8 (N, C, H, W), labels long (N,)) of one split."""
    if split not in source.splits:
        raise ValueError(f"split={split!r}; valid choices: {sorted(source.splits)}")
    if source.kind == "idx":
        img_name, lab_name = source.splits[split]
        images = read_idx(find_file(root, source, img_name))
        labels = read_idx(find_file(root, source, lab_name))
        images = images.reshape(images.shape[0], *source.shape)
    else:
        images, labels = read_cifar_bin([find_file(root, source, n) for n in source.splits[split]])
    if len(images) != len(labels):
        raise ValueError(f"{source.name} {split}: {len(images)} images but {len(labels)} labels")
    if images.shape[1:] != source.shape:
        raise ValueError(f"{source.name} {split}: images have shape {images.shape[1:]}, expected {source.shape}")
    if labels.size and labels.max() >= len(source.classes):
        raise ValueError(f"{source.name} {split}: label {int(labels.max())} >= {len(source.classes)} classes")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# Data set and augmentation


def random_crop(x_CHW: Tensor, pad: int) -> Tensor:
    """Zero-pad by ``pad`` on every side, then crop back to (H, W) at a random offset
    (global torch RNG)."""
    H, W = x_CHW.shape[-2:]
    padded = F.pad(x_CHW, (pad, pad, pad, pad))
    i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return padded[..., i : i + H, j : j + W]


class ImageClassification(Dataset):
    """A whole split as uint8 (N, C, H, W) in memory; items are normalised float images."""

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                 pad: int = 0, flip: bool = False, classes: Sequence[str] = ()):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.pad, self.flip, self.classes = pad, flip, tuple(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float().div_(255)  # (C, H, W) in [0, 1]; padding is black, as in torchvision
        if self.pad:
            x = random_crop(x, self.pad)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"images": (x - self.mean) / self.std, "labels": self.labels[i]}


def build_image_dataset(name: str, split: str, root: str | Path = "data", augment: Optional[bool] = None,
                        limit: int = 0) -> ImageClassification:
    """``augment`` defaults to True for train, False for test; ``limit`` keeps the first N examples."""
    source = get_source(name)
    images, labels = load_split(source, split, root)
    if limit:
        images, labels = images[:limit], labels[:limit]
    augment = (split == "train") if augment is None else bool(augment)
    pad, flip = (source.pad, source.flip) if augment else (0, False)
    log.debug("%s %s: %d images from %s (augment=%s)", name, split, len(labels), root, augment)
    return ImageClassification(images, labels, source.mean, source.std, pad, flip, source.classes)


def _register(name: str) -> None:
    def make(split: str, root: str = "data", augment: Optional[bool] = None, limit: int = 0) -> ImageClassification:
        return build_image_dataset(name, split, root, augment, limit)

    DATASETS.register(name)(make)


for _name in SOURCES:
    _register(_name)


# ------------------------------------------------------------------------------------------------
# Fetch: copy from a local install or download, then verify


@dataclass
class FileReport:
    path: Path
    size: int
    sha256: str  # of the file as stored
    content_sha256: str  # of the decompressed bytes (equal to sha256 for plain files)
    verified_by: str  # "md5" (official file md5), "content-md5" (of the decompressed bytes), "size"
    origin: str  # "present", a local path, or a URL


def _digests(data: bytes) -> tuple[str, str]:
    return hashlib.md5(data, usedforsecurity=False).hexdigest(), hashlib.sha256(data).hexdigest()


def verify_file(path: str | Path, spec: RawFile, label: Optional[str] = None) -> tuple[str, str, str]:
    """Check ``path`` against ``spec``; returns (verified_by, sha256 of the file, sha256 of its
    decompressed content).
    Raises ChecksumError naming the file when neither the file's md5, nor the md5 of its
    decompressed content, nor (when no md5 is published) its size matches."""
    path = Path(path)
    label = label or str(path)
    data = path.read_bytes()
    md5, sha = _digests(data)
    content = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    content_md5, content_sha = _digests(content) if content is not data else (md5, sha)
    if spec.md5 and md5 == spec.md5:
        return "md5", sha, content_sha
    if spec.content_md5 and content_md5 == spec.content_md5:
        return "content-md5", sha, content_sha
    if spec.size and len(content) != spec.size:
        raise ChecksumError(f"size mismatch for {label}: {len(content)} bytes, expected {spec.size}")
    if not spec.md5 and not spec.content_md5:
        return "size", sha, content_sha
    want = spec.md5 + (f" (or content md5 {spec.content_md5})" if spec.content_md5 else "")
    raise ChecksumError(f"checksum mismatch for {label}: md5 {md5}, content md5 {content_md5}; official md5 {want}")


def _download(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` to ``dest``."""
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as f:  # noqa: S310 (https/http only)
        shutil.copyfileobj(resp, f, length=1 << 20)


def _obtain(name: str, dest: Path, source: ImageSource, local_dirs: Sequence[str | Path], timeout: float) -> str:
    """Put file ``name`` at ``dest`` (from a local directory, else a URL); returns its origin."""
    for d in local_dirs:
        cand = Path(d) / name
        if cand.is_file():
            shutil.copyfile(cand, dest)
            return str(cand)
    errors = []
    for base in source.urls:
        url = base + name
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"only http(s) URLs are fetched, got {url!r}")
        try:
            _download(url, dest, timeout)
            return url
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
    where = f" and not in {list(map(str, local_dirs))}" if local_dirs else ""
    tried = "; ".join(errors) or "no download URL"
    raise FetchError(
        f"{source.name}: {name} is missing from {dest.parent}{where}, and could not be downloaded ({tried}). "
        + source.offline_hint.format(dir=dest.parent)
    )


def _place(spec: RawFile, dest: Path, source: ImageSource, local_dirs, timeout: float) -> FileReport:
    """Obtain one file into a temporary name, verify it, then move it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        origin = _obtain(spec.name, tmp, source, local_dirs, timeout)
        how, sha, csha = verify_file(tmp, spec, label=f"{dest} (from {origin})")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dest)
    return FileReport(dest, dest.stat().st_size, sha, csha, how, origin)


def _extract_cifar(archive: Path, dest_dir: Path, wanted: Sequence[str]) -> None:
    """Extract only the expected members (by exact name), never arbitrary paths."""
    with tarfile.open(archive, "r:gz") as tar:
        for name in wanted:
            try:
                member = tar.getmember(name)
            except KeyError:
                raise ChecksumError(f"{archive}: member {name!r} is missing") from None
            if not member.isfile():
                raise ChecksumError(f"{archive}: member {name!r} is not a regular file")
            out = dest_dir / name
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def fetch(source: str | ImageSource, root: str | Path = "data", *, local_dirs: Optional[Sequence[str | Path]] = None,
          timeout: float = 30.0) -> list[FileReport]:
    """Make ``root/<name>/`` hold the data set's verified raw files. Files already there are
    verified, missing ones are copied from ``local_dirs`` (default: the source's offline install
    dirs) or downloaded. Raises FetchError (offline / missing) or ChecksumError (bad content)."""
    src = get_source(source) if isinstance(source, str) else source
    local_dirs = src.local_dirs if local_dirs is None else tuple(local_dirs)
    dest_dir = Path(root) / src.name
    if src.archive is not None and not all((dest_dir / f.name).is_file() for f in src.files):
        archive = dest_dir / src.archive.name
        if archive.is_file():
            verify_file(archive, src.archive)
        else:
            _place(src.archive, archive, src, local_dirs, timeout)
        _extract_cifar(archive, dest_dir, [f.name for f in src.files])
    reports = []
    for spec in src.files:
        dest = dest_dir / spec.name
        if dest.is_file():
            how, sha, csha = verify_file(dest, spec)
            reports.append(FileReport(dest, dest.stat().st_size, sha, csha, how, "present"))
        else:
            reports.append(_place(spec, dest, src, local_dirs, timeout))
    return reports
