"""MQAR generator: shapes, answers, determinism, split difference, bad arguments."""
import pytest
import torch

from moh.data import build_dataset
from moh.data.recall import FILLER, IGNORE, MQAR, TOKEN_GROUP_NAMES, token_groups

ARGS = dict(num_examples=50, seq_len=40, num_kv_pairs=6, num_queries=5, vocab_size=32, seed=3)


def _pairs(ids, n):
    return {int(ids[2 * i]): int(ids[2 * i + 1]) for i in range(n)}


def test_registered_and_shapes():
    ds = build_dataset("mqar", "train", **ARGS)
    assert isinstance(ds, MQAR) and len(ds) == 50
    item = ds[7]
    assert set(item) == {"input_ids", "labels"}
    for v in item.values():
        assert v.shape == (40,) and v.dtype == torch.long
    assert int(item["input_ids"].min()) >= 0 and int(item["input_ids"].max()) < 32


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_answer_is_the_value_of_its_key(split):
    ds = build_dataset("mqar", split, **ARGS)
    for i in range(len(ds)):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        pairs = _pairs(ids, 6)
        assert len(pairs) == 6  # keys are distinct
        assert all(1 <= k < 16 for k in pairs) and all(16 <= v < 32 for v in pairs.values())
        answers = (labels != IGNORE).nonzero().squeeze(1)
        assert len(answers) == 5
        asked = []
        for t in answers.tolist():
            assert t >= 13  # after the context (2 * 6 tokens) and its query key
            key = int(ids[t - 1])
            assert int(labels[t]) == pairs[key]
            assert int(ids[t]) == FILLER  # the answer is not in the input (no elimination shortcut)
            asked.append(key)
        assert len(set(asked)) == 5  # distinct queried keys


def test_decoder_loss_counts_only_the_answers():
    """Decoder.forward predicts labels[t + 1] from position t: the query keys' positions."""
    from moh.models import create_model

    ds = build_dataset("mqar", "train", **ARGS)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    model = create_model("llm-demo-mha", vocab_size=32, max_seq_len=64, dim=32, depth=1)
    out = model(**batch)
    logp = out.logits[:, :-1].log_softmax(-1)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    manual = -logp[keep].gather(-1, target[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, manual)


def test_deterministic_and_splits_differ():
    a, b = build_dataset("mqar", "train", **ARGS), build_dataset("mqar", "train", **ARGS)
    for i in (0, 13, 49):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
        assert torch.equal(a[i]["labels"], b[i]["labels"])
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])
    test = build_dataset("mqar", "test", **ARGS)
    other_seed = build_dataset("mqar", "train", **{**ARGS, "seed": 4})
    train_seqs = {tuple(a[i]["input_ids"].tolist()) for i in range(len(a))}
    assert not train_seqs & {tuple(test[i]["input_ids"].tolist()) for i in range(len(test))}
    assert not train_seqs & {tuple(other_seed[i]["input_ids"].tolist()) for i in range(len(other_seed))}


def test_token_groups_mark_roles():
    ds = build_dataset("mqar", "test", **ARGS)
    ids, labels = ds[0]["input_ids"][None], ds[0]["labels"][None]
    g = token_groups(ids, labels, 6)[0]
    assert g.shape == (40,) and len(TOKEN_GROUP_NAMES) == 4
    assert g[:12].tolist() == [0, 1] * 6
    query_pos = (labels[0] != IGNORE).nonzero().squeeze(1) - 1
    assert (g[query_pos] == 2).all() and int((g == 2).sum()) == 5
    assert (g[12:][g[12:] != 2] == 3).all()


def test_more_queries_than_pairs_ask_every_key_once_per_round():
    """Q = 2N + 1: each key is asked twice in the first 2N queries (one random order per round)
    plus once more; every answer is still its key's value and never in the input."""
    ds = build_dataset("mqar", "train", **{**ARGS, "num_kv_pairs": 3, "num_queries": 7, "seq_len": 24})
    orders = set()
    for i in range(len(ds)):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        pairs = _pairs(ids, 3)
        answers = (labels != IGNORE).nonzero().squeeze(1).tolist()
        assert len(answers) == 7
        asked = [int(ids[t - 1]) for t in answers]
        assert [int(labels[t]) for t in answers] == [pairs[k] for k in asked]
        assert all(int(ids[t]) == FILLER for t in answers)
        assert sorted(asked[:3]) == sorted(asked[3:6]) == sorted(pairs) and asked[6] in pairs
        orders.add(tuple(sorted(pairs).index(k) for k in asked[:3]))
    assert len(orders) > 1  # the rounds are shuffled, not a fixed pattern


@pytest.mark.parametrize(
    "bad, word",
    [
        (dict(num_queries=0), "num_queries"),
        (dict(num_queries=15), "seq_len"),  # 2*6 + 2*15 > 40 tokens
        (dict(vocab_size=12), "vocab_size"),
        (dict(seq_len=20), "seq_len"),
        (dict(num_examples=0), "num_examples"),
    ],
)
def test_bad_arguments_name_the_value(bad, word):
    with pytest.raises(ValueError, match=word):
        MQAR("train", **{**ARGS, **bad})


def test_bad_split_and_index():
    with pytest.raises(ValueError, match="split"):
        MQAR("valid", **ARGS)
    with pytest.raises(IndexError):
        MQAR("train", **ARGS)[50]
