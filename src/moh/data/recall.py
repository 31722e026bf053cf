"""Multi-query associative recall (MQAR), the in-context recall probe of the Zoology paper
(Arora et al., 2023, arXiv 2312.04927), generated on the fly: nothing to download.

One example of length T with N key-value pairs and Q queries:

    k1 v1 k2 v2 ... kN vN | 0 0 kq1 0 0 0 kq2 0 0 ...
    '---- context, 2N ----'  '--- query keys at random even slots, filler 0 elsewhere ---'

Keys come from ids [1, V/2), values from [V/2, V); 0 is the filler. The queried keys are distinct
keys of the context in random order; with Q > N every key is asked once per round of N queries
(each round in a fresh random order), so more supervised positions fit in one sequence. ``labels`` is -100 everywhere except right after each query
key, where it holds that key's value (the decoder's logits at t predict labels[t + 1]), so the loss
and the accuracy count exactly the recalled values. As in Zoology, the answers are *not* written
into the input: if they were, a model could answer the last queries by elimination (the context
value not yet answered) without recalling anything, and small models get stuck on that shortcut.

Every item is a pure function of (seed, split, index): the per-item generator is seeded with the
three numbers through numpy's ``SeedSequence`` (a hash, so neighbouring seeds or indices give
unrelated streams), and the split is one of them, so train and test never share a stream.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from moh.data import DATASETS

FILLER = 0
IGNORE = -100
_SPLIT_SALT = {"train": 0, "test": 1}


@DATASETS.register("mqar")
class MQAR(Dataset):
    """Items ``{"input_ids": (T,), "labels": (T,)}`` (int64)."""

    def __init__(
        self,
        split: str = "train",
        num_examples: int = 20000,
        seq_len: int = 64,
        num_kv_pairs: int = 8,
        num_queries: int | None = None,
        vocab_size: int = 64,
        seed: int = 0,
    ):
        if split not in _SPLIT_SALT:
            raise ValueError(f"split={split!r}; valid choices: {sorted(_SPLIT_SALT)}")
        num_queries = num_kv_pairs if num_queries is None else num_queries
        half = vocab_size // 2
        checks = [
            (num_examples >= 1, f"num_examples={num_examples} must be >= 1"),
            (num_kv_pairs >= 1, f"num_kv_pairs={num_kv_pairs} must be >= 1"),
            (num_queries >= 1, f"num_queries={num_queries} must be >= 1"),
            (half - 1 >= num_kv_pairs, f"vocab_size={vocab_size} leaves {half - 1} key ids for num_kv_pairs={num_kv_pairs}"),
            (vocab_size - half >= num_kv_pairs, f"vocab_size={vocab_size} leaves {vocab_size - half} value ids for num_kv_pairs={num_kv_pairs}"),
            # each query takes two slots (key, value) after the context
            (seq_len >= 2 * num_kv_pairs + 2 * num_queries, f"seq_len={seq_len} < 2*num_kv_pairs + 2*num_queries = {2 * (num_kv_pairs + num_queries)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.split, self.num_examples, self.seq_len = split, num_examples, seq_len
        self.num_kv_pairs, self.num_queries, self.vocab_size, self.seed = num_kv_pairs, num_queries, vocab_size, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, _SPLIT_SALT[self.split], index])
        N, Q, T, half = self.num_kv_pairs, self.num_queries, self.seq_len, self.vocab_size // 2
        keys_N = rng.permutation(half - 1)[:N] + 1
        values_N = rng.permutation(self.vocab_size - half)[:N] + half
        ids_T = np.full(T, FILLER, dtype=np.int64)
        ids_T[0 : 2 * N : 2], ids_T[1 : 2 * N : 2] = keys_N, values_N
        # Q query slots among the free pairs of positions after the context, in order
        free_pairs = (T - 2 * N) // 2
        slots_Q = np.sort(rng.permutation(free_pairs)[:Q]) * 2 + 2 * N
        # which pairs are asked: a random order of all N, again for each further round (Q > N)
        which_Q = np.concatenate([rng.permutation(N) for _ in range(-(-Q // N))])[:Q]
        ids_T[slots_Q] = keys_N[which_Q]  # the answer slot after each query stays filler
        labels_T = np.full(T, IGNORE, dtype=np.int64)
        labels_T[slots_Q + 1] = values_N[which_Q]
        return {"input_ids": torch.from_numpy(ids_T), "labels": torch.from_numpy(labels_T)}

    def chance_accuracy(self) -> float:
        """Accuracy of guessing uniformly among the value ids (what a model that cannot recall gets
        at best without reading the context: 1 / number of value ids)."""
        return 1.0 / (self.vocab_size - self.vocab_size // 2)


def token_groups(input_ids_BT: Tensor, labels_BT: Tensor, num_kv_pairs: int) -> Tensor:
    """Per-token role (B, T) for routing analysis: 0 context key, 1 context value, 2 query key
    (the token whose next-token prediction is a recall), 3 other (filler)."""
    B, T = input_ids_BT.shape
    t = torch.arange(T, device=input_ids_BT.device).expand(B, T)
    group = torch.full((B, T), 3, dtype=torch.long, device=input_ids_BT.device)
    ctx = t < 2 * num_kv_pairs
    group[ctx & (t % 2 == 0)] = 0
    group[ctx & (t % 2 == 1)] = 1
    is_query = torch.zeros_like(ctx)
    is_query[:, :-1] = labels_BT[:, 1:] != IGNORE
    group[is_query] = 2
    return group


TOKEN_GROUP_NAMES = ["context key", "context value", "query key", "other"]
