"""Domain FID: torchmetrics FID with moh's classifier features; the extractor's fixed recipe."""
import json
from types import SimpleNamespace

import pytest
import torch

from moh.data.images import ImageClassification
from moh.eval.fid import (ClassifierCNN, FEATURES, _Features, fid, inception_extractor, load_classifier, sha256_file,
                          train_classifier)


def tiny_images(n: int, seed: int) -> ImageClassification:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 40, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, 0, 4 * c : 4 * c + 3] = 220  # class c: a bright band
    return ImageClassification(images, labels, (0.3,), (0.3,), classes=("a", "b", "c"))


def test_fid_of_identical_sets_is_zero_and_of_different_sets_positive():
    torch.manual_seed(0)
    features = _Features(ClassifierCNN(1, 12, 3))
    a = torch.randn(400, 1, 12, 12)
    b = torch.randn(400, 1, 12, 12)
    shifted = a * 1.5 + 0.7
    same = fid(features, a, a)
    assert abs(same) < 1e-3
    other_half = fid(features, a, b)  # the same distribution: small, from sampling noise only
    assert fid(features, a, shifted) > 10 * max(other_half, 1e-3) > 0
    with pytest.raises(ValueError, match="at least 2 images"):
        fid(features, a[:1], b)


def test_classifier_recipe_is_deterministic_and_recorded(tmp_path):
    train, test = tiny_images(96, 0), tiny_images(30, 1)
    rec = train_classifier(train, test, tmp_path / "a.safetensors", epochs=3, batch_size=16, lr=5e-3)
    again = train_classifier(train, test, tmp_path / "b.safetensors", epochs=3, batch_size=16, lr=5e-3)
    assert rec["sha256"] == again["sha256"] == sha256_file(tmp_path / "a.safetensors")
    assert rec["test_top1"] > 0.9  # the bands are easy
    stored = json.loads((tmp_path / "a.safetensors.json").read_text())
    assert stored["sha256"] == rec["sha256"] and stored["recipe"]["threads"] == 1
    net = load_classifier(tmp_path / "a.safetensors", 1, 12, 3)
    assert net.features(torch.zeros(2, 1, 12, 12)).shape == (2, 128)
    with pytest.raises(ValueError, match="not a ClassifierCNN for 1x28x28"):
        load_classifier(tmp_path / "a.safetensors", 1, 28, 3)


def test_extractors_by_name_and_inception_needs_its_weights():
    assert {"classifier", "inception"} <= set(FEATURES.names())
    with pytest.raises(ValueError, match="unknown feature extractor 'clip'"):
        FEATURES.get("clip")
    cfg = SimpleNamespace(data=SimpleNamespace(name="fashion-mnist", args={}))
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs torch-fidelity"):
            inception_extractor(cfg, SimpleNamespace(inception_weights=None))
    else:  # installed: offline the default weights cannot be downloaded, a missing file cannot be read
        with pytest.raises(ValueError, match="Inception weights could not be loaded"):
            inception_extractor(cfg, SimpleNamespace(inception_weights="/nonexistent/weights.pth"))
