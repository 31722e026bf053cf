"""Execution backends: compute the gated attention output for a routing decision.

Each backend is a callable ``fn(call: AttentionCall) -> Tensor (B, T, D)`` (the output
projection and its bias included) registered by name; all are numerically equivalent.
``reference`` is the ground truth, ``masked`` computes every head then zeroes the unused ones
(what the authors' code does), ``sparse`` computes only the (token, head) pairs the router chose.
Register your own with ``@BACKENDS.register("name")``.
"""
from moh.backends.base import BACKENDS, AttentionCall, full_mask  # noqa: F401
from moh.backends import reference, masked, sparse  # noqa: F401,E402  (register)
