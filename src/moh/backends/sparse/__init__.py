"""The sparse backend: work only for the (token, head) pairs the router selected.

    plan.py     which heads run whole, gathered (in chunks) or not at all
    rows.py     gathering the rows of partially used heads; the keys/values each head reads
    kernels.py  the attention kernels and ``choose_kernel`` (device, dtype, mask kind, rows, keys)
    tuning.py   ``SparseTuning``: the constants, one frozen object per device kind
    backend.py  ``SparseBackend``, registered as "sparse"
"""
from moh.backends.sparse.backend import SparseBackend  # noqa: F401  (registers "sparse")
from moh.backends.sparse.tuning import SparseTuning, tuning_for  # noqa: F401
