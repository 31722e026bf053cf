"""Resume is exact with DataLoader workers and random augmentation: an item's random crop / flip
is a function of (seed, epoch, index), not of which worker loads it or when its iterator began."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moh.data.images import ImageClassification
from moh.train.engine import fit
from moh.train.sampler import EpochKeyedBatches, ResumableBatchSampler, SeededItems

RUN = ["train.steps=6", "train.save_every=3", "train.keep_last=0", "train.log_every=1", "train.tensorboard=false",
       "train.batch_size=16", "train.metrics_csv=false"]


def augmented(n=48):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    return ImageClassification(images, labels, mean=(0.5,), std=(0.25,), pad=2, flip=True)  # crop + flip


def weights(out):
    return load_file(str(out / "model.safetensors"))


def test_items_depend_on_seed_epoch_index_only():
    data = SeededItems(augmented(), seed=3)
    a = data[(5, 0)]["images"]
    torch.manual_seed(123)  # the caller's generator state does not matter ...
    assert torch.equal(data[(5, 0)]["images"], a)
    state = torch.get_rng_state()
    data[(6, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left as it was (dropout's stream)
    assert not torch.equal(data[(5, 1)]["images"], a)  # another epoch: another crop / flip
    assert not torch.equal(SeededItems(augmented(), seed=4)[(5, 0)]["images"], a)
    keyed = iter(EpochKeyedBatches(ResumableBatchSampler(48, 16, seed=0, start=2)))
    assert [e for _, e in next(keyed)] == [0] * 16 and [e for _, e in next(keyed)] == [1] * 16


@pytest.mark.slow
def test_resume_with_two_workers_and_augmentation_is_exact(smoke_cfg, tmp_path):
    data = augmented()
    ref = tmp_path / "ref"
    fit(smoke_cfg(*RUN, "train.num_workers=2", f"train.out_dir={ref}"), train_data=data, eval_data=data)
    cut = tmp_path / "cut"  # as if killed after the step-3 checkpoint
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    (cut / "final.json").unlink()
    (cut / "model.safetensors").unlink()
    fit(smoke_cfg(*RUN, "train.num_workers=2", f"train.out_dir={cut}", "train.resume=true"), train_data=data,
        eval_data=data)
    a, b = weights(ref), weights(cut)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    # and the same numbers without workers: where an item is loaded does not matter
    inproc = tmp_path / "inproc"
    fit(smoke_cfg(*RUN, "train.num_workers=0", f"train.out_dir={inproc}"), train_data=data, eval_data=data)
    c = weights(inproc)
    assert all(torch.equal(a[k], c[k]) for k in a)
