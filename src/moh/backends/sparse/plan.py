"""The plan of one sparse call: which heads run whole, which gathered (in which chunks), which
not at all. A pure function of how many tokens use each head, so it is tested on its own.

Shape legend: B batch, T queries, S key positions, D width, H heads.
"""
from __future__ import annotations

from dataclasses import dataclass

from moh.backends.sparse.tuning import SparseTuning


@dataclass(frozen=True)
class Plan:
    full: list[tuple[int, int]]  # runs [h0, h1) of heads computed for every row (no gather)
    partial: list[tuple[list[int], int]]  # chunks (heads, M): gathered, M = most rows of one item and head
    # heads in neither are used by no token: skipped


def runs(heads: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]: contiguous ranges, so a run is one weight slice."""
    out: list[tuple[int, int]] = []
    for h in heads:
        if out and out[-1][1] == h:
            out[-1] = (out[-1][0], h + 1)
        else:
            out.append((h, h + 1))
    return out


def make_plan(counts_BH: list[list[int]], *, T: int, S: int, D: int, causal: bool, element_size: int,
              threads: int, tuning: SparseTuning) -> Plan:
    """``counts_BH[b][h]``: tokens of item b that use head h.

    A head every row uses runs whole. A head most rows use is cheaper computed for every row
    (gate 0 where unused) than gathered; over few keys any used head is (the attention skipped
    costs less than gathering the rows). The rest are gathered, a few heads at a time so the
    gathered rows stay near ``tuning.chunk_bytes`` (``chunk_bytes_threaded`` with more than one
    thread), in whole multiples of the thread count
    (batched kernels split evenly over heads)."""
    B = len(counts_BH)
    H = len(counts_BH[0]) if B else 0
    per_head = [sum(c[h] for c in counts_BH) for h in range(H)]
    frac = tuning.dense_from_causal if causal and T > 1 else tuning.dense_from
    dense = 0 if S < tuning.gather_min_keys_per_width * D else B * T * frac
    full = runs([h for h, n in enumerate(per_head) if n == B * T or 0 < n >= dense])
    gathered = [h for h, n in enumerate(per_head) if 0 < n < min(dense, B * T)]
    rows = max([c[h] for c in counts_BH for h in gathered], default=0)
    budget = tuning.chunk_bytes if threads == 1 or tuning.chunk_bytes_threaded is None else tuning.chunk_bytes_threaded
    step = max(1, budget // max(B * rows * D * element_size, 1))
    if step > threads:
        step -= step % threads
    chunks = [gathered[i : i + step] for i in range(0, len(gathered), step)]
    return Plan(full, [(c, max(cb[h] for cb in counts_BH for h in c)) for c in chunks])
