"""moh — Mixture-of-Head attention (MoH; Jin, Zhu, Yuan, Yan, arXiv 2410.11842) for PyTorch.

Multi-head attention sums the outputs of all heads; MoH treats heads as experts: every token
uses a few *shared* heads and its *top-k routed* heads, and the head outputs are summed with
router weights. moh has one attention module with the paper's routers and execution backends
that really skip the work of unselected heads (forward, backward, KV-cached decoding), the
paper's model families as presets, a training engine, analysis pictures and benchmarks.

    >>> import torch, moh
    >>> cfg = moh.MoHConfig(dim=64, num_heads=8, num_shared=2, top_k=2, causal=True)  # 4 of 8 heads
    >>> out = moh.MoHAttention(cfg)(torch.randn(2, 16, 64))
    >>> out.output.shape, moh.load_balance_loss(out.routing).dim()
    (torch.Size([2, 16, 64]), 0)

Public API: ``MoHAttention`` / ``MoHConfig`` (one layer), ``Routing`` and ``load_balance_loss``
(the routing decision and the paper's Eq. 7), ``ROUTERS`` / ``BACKENDS`` (registries:
``@moh.BACKENDS.register("mine")``), ``set_backend(model, name)``, ``create_model(name)`` /
``list_models()`` (presets). The command line is ``moh`` (``moh --help``).
"""
from importlib.metadata import PackageNotFoundError, version as _version

from moh.config import MoHConfig
from moh.core.routing import Routing, load_balance_loss
from moh.registry import BACKENDS, ROUTERS
from moh.core.attention import MoHAttention, MoHOutput, set_backend  # registers routers and backends
from moh.models import create_model, list_models
import moh.hf  # noqa: E402,F401  (registers MoHLMConfig / MoHForCausalLM with transformers' Auto classes)

try:
    __version__ = _version("moh-attention")
except PackageNotFoundError:  # pragma: no cover  (running from a source tree that is not installed)
    __version__ = "0+unknown"

__all__ = ["MoHAttention", "MoHConfig", "MoHOutput", "Routing", "load_balance_loss", "ROUTERS", "BACKENDS",
           "set_backend", "create_model", "list_models", "__version__"]
