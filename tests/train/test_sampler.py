import itertools

import pytest

from moh.train.sampler import ResumableBatchSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableBatchSampler(20, 4, seed=3), ResumableBatchSampler(20, 4, seed=3)
    assert take(a, 12) == take(b, 12)
    assert take(a, 5) != take(ResumableBatchSampler(20, 4, seed=4), 5)
    epoch0, epoch1 = take(a, 5), take(a, 10)[5:]
    assert sorted(sum(epoch0, [])) == list(range(20))  # an epoch is a permutation
    assert epoch0 != epoch1  # a new order each epoch


def test_start_resumes_mid_stream():
    full = take(ResumableBatchSampler(21, 4, seed=0), 13)  # 5 batches / epoch, tail item dropped
    assert take(ResumableBatchSampler(21, 4, seed=0, start=7), 6) == full[7:]


def test_ranks_split_the_global_batch():
    single = take(ResumableBatchSampler(24, 6, seed=1), 8)
    r0 = take(ResumableBatchSampler(24, 3, seed=1, rank=0, world_size=2), 8)
    r1 = take(ResumableBatchSampler(24, 3, seed=1, rank=1, world_size=2), 8)
    assert [a + b for a, b in zip(r0, r1)] == single


def test_too_small_data_set_raises():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 4, seed=0, world_size=2)
