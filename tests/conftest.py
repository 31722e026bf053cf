"""Loaded by pytest before any test module: without CUDA the Triton kernels run in Triton's CPU
interpreter, which must be switched on before anything imports triton (``import moh`` imports
transformers, which imports triton; a triton imported without the interpreter decorates its own
``tl`` helpers as compiled functions, and every interpreted kernel then fails)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
