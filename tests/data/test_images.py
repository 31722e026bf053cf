"""Image data sets from fake raw files (IDX, CIFAR-10 binary) and the fetch step, offline."""
import dataclasses
import gzip
import hashlib
import io
import struct
import tarfile

import numpy as np
import pytest
import torch

from moh.cli import main as moh_main
from moh.data import build_dataset
from moh.data.images import SOURCES, ChecksumError, FetchError, ImageSource, RawFile, fetch, read_idx


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX by hand: 0, 0, type 0x08, ndim, big-endian int32 dims, data."""
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_fake_idx(dirpath, n_train=6, n_test=4, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    dirpath.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
            data = idx_bytes(arr)
            (dirpath / name).write_bytes(gzip.compress(data, mtime=0) if gz else data)
        out[prefix] = (images, labels)
    return out


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    rec = np.concatenate([labels[:, None], images.reshape(len(labels), -1)], axis=1).astype(np.uint8)
    return rec.tobytes()


def fake_cifar(n=3, seed=0):
    rng = np.random.default_rng(seed)
    members = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        members[name] = (images, labels)
    return members


def test_idx_round_trip_gz_and_plain(tmp_path):
    for gz in (True, False):
        root = tmp_path / ("gz" if gz else "plain")
        truth = write_fake_idx(root / "fashion-mnist", gz=gz)
        for split, prefix in (("train", "train"), ("test", "t10k")):
            ds = build_dataset("fashion-mnist", split, root=str(root), augment=False)
            images, labels = truth[prefix]
            assert len(ds) == len(labels)
            item = ds[1]
            want = (torch.from_numpy(images[1]).float()[None] / 255 - 0.2860) / 0.3530
            torch.testing.assert_close(item["images"], want)
            assert item["images"].shape == (1, 28, 28) and item["labels"].dtype == torch.long
            assert item["labels"].item() == labels[1]


def test_root_may_point_at_the_raw_files_and_limit(tmp_path):
    truth = write_fake_idx(tmp_path, n_train=7)  # files directly in root, like /usr/share/datasets/...
    ds = build_dataset("mnist", "train", root=str(tmp_path), augment=False, limit=3)
    assert len(ds) == 3
    assert ds[2]["labels"].item() == truth["train"][1][2]


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">i", 3) + b"abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(np.zeros(5, np.uint8))[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)


def test_missing_files_name_the_fetch_command(tmp_path):
    with pytest.raises(ValueError, match="moh data fetch fashion-mnist"):
        build_dataset("fashion-mnist", "train", root=str(tmp_path))


def test_cifar_binary_round_trip(tmp_path):
    members = fake_cifar()
    d = tmp_path / "cifar10" / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name, (im, lab) in members.items():
        (d / name).write_bytes(cifar_bytes(im, lab))
    train = build_dataset("cifar10", "train", root=str(tmp_path), augment=False)
    test = build_dataset("cifar10", "test", root=str(tmp_path), augment=False)
    assert len(train) == 15 and len(test) == 3
    im, lab = members["data_batch_2.bin"]  # item 4 = second record of batch 2
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(train[4]["images"], (torch.from_numpy(im[1]).float() / 255 - mean) / std)
    assert train[4]["labels"].item() == lab[1]


def _crops(x, pad, flip):
    """Every image the augmentation may produce from x (C, H, W)."""
    H, W = x.shape[-2:]
    p = torch.nn.functional.pad(x, (pad,) * 4)
    out = [p[..., i : i + H, j : j + W] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return out + [c.flip(-1) for c in out] if flip else out


@pytest.mark.parametrize("name,flip", [("fashion-mnist", True), ("mnist", False)])
def test_augmentation_is_a_crop_or_flip_and_deterministic(tmp_path, name, flip):
    write_fake_idx(tmp_path / name, n_train=8)
    aug = build_dataset(name, "train", root=str(tmp_path))  # train: augment by default
    plain = build_dataset(name, "train", root=str(tmp_path), augment=False)
    torch.manual_seed(123)
    first = [aug[i]["images"] for i in range(8)]
    torch.manual_seed(123)
    second = [aug[i]["images"] for i in range(8)]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    src = SOURCES[name]
    black = (0 - src.mean[0]) / src.std[0]  # zero padding, after normalisation
    changed = 0
    for i, a in enumerate(first):
        raw = plain[i]["images"]
        padded_raw = (raw * src.std[0] + src.mean[0])  # back to [0, 1], pad with 0 like the data set
        options = [(c - src.mean[0]) / src.std[0] for c in _crops(padded_raw, 2, flip)]
        assert any(torch.allclose(a, o, atol=1e-5) for o in options)
        changed += not torch.allclose(a, raw)
        assert a.min() >= min(black, raw.min()) - 1e-5
    assert changed >= 4  # 8 images, each unchanged with probability 1/25 (or 1/50)
    assert build_dataset(name, "test", root=str(tmp_path)).pad == 0  # no augmentation on test


def _fake_source(src_dir, payloads: dict, recompress: bool = False) -> ImageSource:
    """A source whose official md5s are those of ``payloads`` gzipped with mtime 0; the files put
    in ``src_dir`` are gzipped with another mtime when ``recompress`` (like the Debian package)."""
    files = []
    src_dir.mkdir(parents=True, exist_ok=True)
    for name, content in payloads.items():
        official = gzip.compress(content, mtime=0)
        (src_dir / name).write_bytes(gzip.compress(content, mtime=12345) if recompress else official)
        files.append(RawFile(name, hashlib.md5(official).hexdigest(), hashlib.md5(content).hexdigest(), len(content)))
    return dataclasses.replace(SOURCES["fashion-mnist"], name="fake", files=tuple(files), urls=(), local_dirs=(str(src_dir),))


def test_fetch_copies_and_verifies(tmp_path):
    payloads = {"a.gz": idx_bytes(np.arange(10, dtype=np.uint8)), "b.gz": b"\x00" * 100}
    for recompress, how in ((False, "md5"), (True, "content-md5")):
        root = tmp_path / f"root{recompress}"
        src = _fake_source(tmp_path / f"src{recompress}", payloads, recompress)
        reports = fetch(src, root)
        assert [r.verified_by for r in reports] == [how, how]
        assert all(r.origin.startswith(str(tmp_path / f"src{recompress}")) for r in reports)
        assert (root / "fake" / "a.gz").read_bytes() == (tmp_path / f"src{recompress}" / "a.gz").read_bytes()
        assert reports[1].content_sha256 == hashlib.sha256(payloads["b.gz"]).hexdigest()
        again = fetch(src, root)  # present files are verified again, not copied
        assert [r.origin for r in again] == ["present", "present"]


def test_fetch_reports_checksum_failure_with_the_file_name(tmp_path):
    src = _fake_source(tmp_path / "src", {"good.gz": b"x" * 50, "broken.gz": b"y" * 50})
    (tmp_path / "src" / "broken.gz").write_bytes(gzip.compress(b"z" * 50))  # same size, other content
    with pytest.raises(ChecksumError, match="broken.gz"):
        fetch(src, tmp_path / "root")
    assert not (tmp_path / "root" / "fake" / "broken.gz").exists()
    assert not list((tmp_path / "root" / "fake").glob("*.part"))
    # a file already in place that was altered is reported too
    (tmp_path / "root" / "fake" / "good.gz").write_bytes(gzip.compress(b"q" * 49))
    with pytest.raises(ChecksumError, match="good.gz"):
        fetch(src, tmp_path / "root")


def test_fetch_offline_fashion_mnist_says_how_to_install(tmp_path):
    offline = dataclasses.replace(SOURCES["fashion-mnist"], urls=("http://127.0.0.1:9/",))
    with pytest.raises(FetchError, match="apt-get install -y dataset-fashion-mnist") as e:
        fetch(offline, tmp_path, local_dirs=[tmp_path / "nowhere"], timeout=2)
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    mnist = dataclasses.replace(SOURCES["mnist"], urls=("http://127.0.0.1:9/",))
    with pytest.raises(FetchError, match="copy the four official MNIST"):
        fetch(mnist, tmp_path, timeout=2)


def test_fetch_cifar_extracts_only_the_expected_members(tmp_path):
    members = fake_cifar(n=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, (im, lab) in list(members.items()) + [("../evil.bin", members["test_batch.bin"])]:
            data = cifar_bytes(im, lab)
            info = tarfile.TarInfo(name if name.startswith("..") else f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "cifar-10-binary.tar.gz").write_bytes(archive)
    src = dataclasses.replace(
        SOURCES["cifar10"], urls=(), local_dirs=(str(tmp_path / "dl"),),
        archive=RawFile("cifar-10-binary.tar.gz", hashlib.md5(archive).hexdigest()),
        files=tuple(dataclasses.replace(f, size=2 * 3073) for f in SOURCES["cifar10"].files),
    )
    reports = fetch(src, tmp_path / "root")
    assert len(reports) == 6 and all(r.verified_by == "size" for r in reports)
    assert not (tmp_path / "root" / "evil.bin").exists() and not (tmp_path / "evil.bin").exists()
    ds = build_dataset("cifar10", "test", root=str(tmp_path / "root"), augment=False)
    assert ds[1]["labels"].item() == members["test_batch.bin"][1][1]


def test_data_cli(tmp_path, capsys):
    write_fake_idx(tmp_path / "fashion-mnist")
    assert moh_main(["data", "list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist" in out and "present" in out.split("fashion-mnist")[1].splitlines()[0]
    assert moh_main(["data", "fetch", "no-such-set", "--root", str(tmp_path)]) == 2
    assert "no-such-set" in capsys.readouterr().err
