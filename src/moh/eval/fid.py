"""``moh eval`` of a DiT run: FID between test images and generated ones with torchmetrics'
``FrechetInceptionDistance`` and a pluggable feature extractor, the denoising loss, and sampling
throughput (images/s) per attention backend. Writes ``RUN_DIR/eval_fid_<features>.json`` (or ``--out``)
and the generated images it scored, as 8-bit pixels, beside it (``.samples.safetensors``).

Feature extractors by name (``FEATURES``):
  classifier  a small CNN that moh trains on the run's data set with a fixed recipe (seed 0, one
              thread, ``train_classifier``), saved as safetensors under
              ``<data root>/extractors/`` and identified by its sha256. The number is a *domain
              FID*: comparable only between runs that use the same extractor (same checksum),
              never with published Inception FIDs. This is what works offline.
  inception   torch-fidelity's Inception-v3 pool features (2048) as torchmetrics uses them, when
              torch-fidelity is installed and its weights are available (downloaded, or a local
              file via ``--inception-weights``). Images are upsampled to 299x299, grey -> RGB.

Shape legend: N images, C channels, Hi x Wi image size, F features.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from moh.eval import num_threads
from moh.registry import Registry

log = logging.getLogger(__name__)

DISPLAY_NAMES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}


@dataclass
class Extractor:
    """A feature extractor for FID: ``module`` maps images in the data set's scale (N, C, Hi, Wi)
    to features (N, F) and has ``num_features``; ``label`` is what is printed with every number."""

    name: str
    module: nn.Module
    label: str
    sha256: str


# name -> factory(run cfg, options namespace) -> Extractor
FEATURES: Registry[Callable[..., Extractor]] = Registry("feature extractor")


# ---------------------------------------------------------------------------------------------
# the offline extractor: a small classifier moh trains


class ClassifierCNN(nn.Module):
    """conv3x3(C->32)-ReLU-pool2, conv3x3(32->64)-ReLU-pool2, flatten, Linear(->128)-ReLU (the
    features), Linear(128->classes). ``forward(images, labels)`` returns (logits (N, classes),
    cross-entropy or None)."""

    num_features = 128

    def __init__(self, in_chans: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, images: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(images)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))  # (N, F)

    def forward(self, images: Tensor, labels: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        logits = self.head(self.features(images))
        return logits, (F.cross_entropy(logits, labels) if labels is not None else None)


class _Features(nn.Module):
    """Adapter for torchmetrics: images -> features, never in training mode."""

    def __init__(self, net: ClassifierCNN):
        super().__init__()
        self.net = net.eval()
        self.num_features = net.num_features

    def train(self, mode: bool = True) -> "_Features":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images.float())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_classifier(train_data, test_data, path: Path, *, seed: int = 0, epochs: int = 2, batch_size: int = 128,
                     lr: float = 2e-3) -> dict:
    """The fixed recipe: ClassifierCNN, AdamW(lr, wd 0.01) with cosine decay, ``epochs`` passes in
    an order drawn from ``seed``, one intra-op thread (so the result does not depend on the thread
    count). Writes ``path`` (safetensors, atomically) and ``path.json`` (recipe, test top-1,
    sha256); returns that record."""
    from safetensors.torch import save_model

    images, labels = train_data.images, train_data.labels
    C, H = images.shape[1], images.shape[2]
    with num_threads(1):
        torch.manual_seed(seed)
        net = ClassifierCNN(C, H, len(train_data.classes) or int(labels.max()) + 1)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(seed)
        steps = epochs * (len(labels) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        t0, step = time.perf_counter(), 0
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=g)
            for i in range(len(labels) // batch_size):
                idx = order[i * batch_size : (i + 1) * batch_size]
                _, loss = net(_standardise(train_data, images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
            log.info("feature classifier: step %d/%d, loss %.4f", step, steps, loss.item())
        acc = classifier_accuracy(net, test_data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_model(net.eval(), str(tmp))
    os.replace(tmp, path)
    record = dict(recipe=dict(model="ClassifierCNN", in_chans=C, image_size=H, num_classes=net.head.out_features,
                              seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, optimizer="AdamW wd 0.01 cosine",
                              threads=1, augment=False, torch=torch.__version__),
                  test_top1=acc, train_seconds=round(time.perf_counter() - t0, 1), sha256=sha256_file(path))
    path.with_name(path.name + ".json").write_text(json.dumps(record, indent=1))
    log.info("feature classifier: test top-1 %.4f, sha256 %s -> %s", acc, record["sha256"], path)
    return record


def _standardise(data, images_u8: Tensor) -> Tensor:
    return (images_u8.float() / 255 - data.mean) / data.std


@torch.no_grad()
def classifier_accuracy(net: ClassifierCNN, data, batch_size: int = 1000) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        logits, _ = net(_standardise(data, data.images[i : i + batch_size]))
        correct += int((logits.argmax(1) == data.labels[i : i + batch_size]).sum())
    return correct / len(data)


def default_classifier_path(cfg) -> Path:
    root = Path(cfg.data.args.get("root", "data"))
    return root / "extractors" / f"{cfg.data.name}-cnn-s0.safetensors"


def load_classifier(path: Path, in_chans: int, image_size: int, num_classes: int) -> ClassifierCNN:
    from safetensors.torch import load_model

    net = ClassifierCNN(in_chans, image_size, num_classes)
    try:
        load_model(net, str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds; one clear message
        raise ValueError(f"{path}: not a ClassifierCNN for {in_chans}x{image_size}x{image_size} images, "
                         f"{num_classes} classes ({e})") from None
    return net.eval()


@FEATURES.register("classifier")
def classifier_extractor(cfg, opts) -> Extractor:
    """The run's data set's classifier features (trained here once if the file is missing)."""
    from moh.eval.data import eval_dataset

    path = Path(opts.extractor) if getattr(opts, "extractor", None) else default_classifier_path(cfg)
    test = eval_dataset(cfg, "test")
    if not (hasattr(test, "images") and hasattr(test, "mean") and test.images.dtype == torch.uint8):
        raise ValueError(f"--features classifier needs an image classification data set (fashion-mnist, mnist, "
                         f"cifar10); the run used {cfg.data.name!r}")
    C, H = test.images.shape[1], test.images.shape[2]
    if not path.is_file():
        log.warning("no feature classifier at %s: training it (fixed recipe, a few minutes, once)", path)
        train_classifier(eval_dataset(cfg, "train"), test, path)
    sha = sha256_file(path)
    want = getattr(opts, "extractor_sha256", None)
    if want and want != sha:
        raise ValueError(f"--extractor-sha256={want} but {path} has sha256 {sha}: a different extractor")
    net = load_classifier(path, C, H, len(test.classes) or int(test.labels.max()) + 1)
    shown = DISPLAY_NAMES.get(cfg.data.name, cfg.data.name)
    label = (f"domain FID ({shown} classifier features, sha256 {sha}), comparable only between runs with the "
             "same extractor")
    return Extractor("classifier", _Features(net), label, sha)


# ---------------------------------------------------------------------------------------------
# Inception, when its weights are at hand


class _InceptionFeatures(nn.Module):
    """Images in the data set's scale -> torchmetrics' Inception-v3 pool features (N, 2048)."""

    num_features = 2048

    def __init__(self, inception: nn.Module, mean, std):
        super().__init__()
        self.inception = inception
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "_InceptionFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = ((images.float() * self.std + self.mean).clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception(x)


@FEATURES.register("inception")
def inception_extractor(cfg, opts) -> Extractor:
    from moh.eval.sample import data_scale

    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise ValueError("--features inception needs torch-fidelity (pip install torch-fidelity) and its "
                         "Inception weights; offline use --features classifier") from None
    weights = getattr(opts, "inception_weights", None)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=weights)
    except (OSError, RuntimeError) as e:  # no network and no local file (URLError is an OSError)
        raise ValueError(f"the Inception weights could not be loaded ({e}); pass --inception-weights "
                         "PATH (torch-fidelity's pt_inception-2015-12-05 file) or use --features classifier") from None
    sha = sha256_file(Path(weights)) if weights else "torch-fidelity default"
    label = f"FID (Inception-v3 pool features, weights {sha}; {cfg.data.name} images upsampled to 299x299)"
    return Extractor("inception", _InceptionFeatures(net, *data_scale(cfg)), label, sha)


# ---------------------------------------------------------------------------------------------
# FID


@torch.no_grad()
def fid(extractor: nn.Module, real: Tensor, fake: Tensor, batch_size: int = 500) -> float:
    """FID between image sets (N, C, Hi, Wi) (data scale) in ``extractor``'s feature space, with
    torchmetrics' FrechetInceptionDistance (float64 statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    metric = FrechetInceptionDistance(feature=extractor)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size].cpu(), real=is_real)
    return float(metric.compute())


def sampling_throughput(model, backends: list[str], *, images: int, steps: int, cfg_scale: float,
                        scheduler: str) -> dict[str, float]:
    """images/s of ``generate`` (one batch of ``images``, ``steps`` steps, guidance ``cfg_scale``)
    per attention backend, measured one after the other; the model's backend is restored."""
    from moh.core.attention import set_backend
    from moh.eval.sample import generate

    before = [m.cfg.backend for m in _attentions(model)]
    out = {}
    try:
        for name in backends:
            set_backend(model, name)
            generate(model, [0], 1, cfg_scale=cfg_scale, steps=1, scheduler=scheduler)  # warm-up
            t0 = time.perf_counter()
            generate(model, [0], images, cfg_scale=cfg_scale, steps=steps, scheduler=scheduler, batch_size=images)
            out[name] = images / (time.perf_counter() - t0)
    finally:
        for m, b in zip(_attentions(model), before):
            m.set_backend(b)
    return out


def _attentions(model) -> list:
    from moh.core.attention import MoHAttention

    return [m for m in model.modules() if isinstance(m, MoHAttention)]


# ---------------------------------------------------------------------------------------------
# the ``moh eval`` part for DiT runs


def add_dit_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moh eval`` that only DiT runs use."""
    from moh.diffusion import SCHEDULERS

    g = p.add_argument_group("DiT runs (domain FID, sampling throughput)")
    g.add_argument("--features", default="classifier", help="FID feature extractor: classifier (offline) or inception")
    g.add_argument("--extractor", default=None, help="classifier weights (default <data root>/extractors/<data>-cnn-s0.safetensors; trained if missing)")
    g.add_argument("--extractor-sha256", default=None, help="refuse an extractor with another checksum")
    g.add_argument("--inception-weights", default=None, help="local torch-fidelity Inception weights file")
    g.add_argument("--num-samples", type=int, default=1000, help="generated images for FID (default 1000, classes balanced)")
    g.add_argument("--num-real", type=int, default=0, help="test images for FID (default 0: the whole split)")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale of the FID samples (default 1.5)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    g.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="sampler (default ddim)")
    g.add_argument("--seed", type=int, default=0, help="seed of the generated images (default 0)")
    g.add_argument("--throughput-backends", default="sparse,masked", help="backends to time sampling with ('' skips)")
    g.add_argument("--throughput-images", type=int, default=32, help="images per throughput batch (default 32)")


def check_dit_args(args: argparse.Namespace, num_classes: int) -> list[str]:
    """The throughput backends; ValueError naming a bad value."""
    from moh.backends import BACKENDS
    from moh.diffusion import check_sampling

    check_sampling(steps=args.steps, cfg_scale=args.cfg_scale)
    if not args.cfg_scale < float("inf"):
        raise ValueError(f"--cfg-scale={args.cfg_scale} must be a finite number >= 0")
    FEATURES.get(args.features)
    if args.num_samples < 2 or args.num_samples % num_classes:
        raise ValueError(f"--num-samples={args.num_samples} must be >= 2 and a multiple of the {num_classes} classes")
    if args.num_real < 0 or args.num_real == 1 or args.throughput_images < 1:
        raise ValueError(f"--num-real={args.num_real} must be 0 or >= 2, --throughput-images={args.throughput_images} >= 1")
    backends = [b.strip() for b in args.throughput_backends.split(",") if b.strip()]
    for b in backends:
        BACKENDS.get(b)
    return backends


def from_pixels(pixels_NHWC, mean, std) -> Tensor:
    """uint8 (N, Hi, Wi, C) -> standardised (N, C, Hi, Wi): generated images enter FID the way real
    ones do, clamped to [0, 1] and rounded to 8 bits (values outside the pixel range would otherwise
    count against a model for what no image file can hold)."""
    x = torch.from_numpy(pixels_NHWC).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def real_images(cfg, limit: int = 0) -> Tensor:
    """The test split in the data set's scale (N, C, Hi, Wi), the first ``limit`` (0: all)."""
    from moh.eval.data import eval_dataset

    data = eval_dataset(cfg, "test")
    n = len(data) if not limit else min(limit, len(data))
    return torch.stack([data[i]["images"] for i in range(n)])


def _save_atomic(tensors: dict, path: Path) -> None:
    """safetensors ``save_file`` through a new temporary file and a rename: a symbolic link
    planted at ``path`` is replaced, never written through."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def run_dit_eval(args: argparse.Namespace, model, cfg) -> int:
    """``moh eval`` of a DiT run (called by ``moh.eval.classify.run``)."""
    from moh.core.attention import set_backend
    from moh.eval.data import eval_dataset
    from moh.eval.sample import data_scale, generate, to_pixels
    from moh.train.checkpoint import atomic_write_text
    from moh.train.engine import evaluate

    from moh.train.rundir import check_writable_file

    num_classes = model.cfg.num_classes
    backends = check_dit_args(args, num_classes)
    # both outputs are checked before the work (a directory, a planted symbolic link, read-only)
    out = Path(args.out) if getattr(args, "out", None) else Path(args.run_dir) / f"eval_fid_{args.features}.json"
    check_writable_file(out, "--out" if getattr(args, "out", None) else "result file")
    check_writable_file(out.with_suffix(".samples.safetensors"), "samples file")
    model.use_ema()
    set_backend(model, args.backend)
    extractor = FEATURES.get(args.features)(cfg, args)
    t0 = time.perf_counter()
    fake = generate(model, list(range(num_classes)), args.num_samples // num_classes, cfg_scale=args.cfg_scale,
                    steps=args.steps, scheduler=args.scheduler, seed=args.seed, batch_size=args.batch_size)
    gen_seconds = time.perf_counter() - t0
    pixels = to_pixels(fake, *data_scale(cfg))  # (N, Hi, Wi, C) uint8, as a PNG would hold them
    fake = from_pixels(pixels, *data_scale(cfg))
    real = real_images(cfg, args.num_real)
    n_real = len(real)
    value = fid(extractor.module, real, fake)
    torch.manual_seed(args.seed)  # the denoising loss draws timesteps and noise
    denoise = evaluate(model, eval_dataset(cfg, args.split), batch_size=args.batch_size, max_batches=args.max_batches)
    speed = sampling_throughput(model, backends, images=args.throughput_images, steps=args.steps,
                                cfg_scale=args.cfg_scale, scheduler=args.scheduler)
    result = dict(run_dir=str(args.run_dir), model=cfg.model.name, data=cfg.data.name, fid=value, fid_kind=extractor.label,
                  features=extractor.name, extractor_sha256=extractor.sha256, num_generated=len(fake),
                  num_real=n_real, cfg_scale=args.cfg_scale, steps=args.steps, scheduler=args.scheduler,
                  seed=args.seed, backend=args.backend, ema=True, generate_seconds=round(gen_seconds, 2),
                  denoise_loss=denoise.get("loss"), heads_active=denoise.get("heads_active"),
                  sampling_images_per_s={k: round(v, 3) for k, v in speed.items()}, threads=torch.get_num_threads())
    atomic_write_text(out, json.dumps(result, indent=1))
    _save_atomic({"pixels_NHWC": torch.from_numpy(pixels).contiguous()}, out.with_suffix(".samples.safetensors"))
    rates = "  ".join(f"{k} {v:.2f} img/s" for k, v in speed.items())
    print(f"{cfg.model.name}  {cfg.data.name}: {value:.3f} {extractor.label}; {len(fake)} generated "
          f"({args.scheduler} {args.steps} steps, cfg {args.cfg_scale:g}, EMA) vs {n_real} test images; "
          f"denoising MSE {denoise.get('loss', float('nan')):.4f}; sampling {rates or '-'} -> {out}")
    return 0
