"""Loaded by pytest before any test module: without CUDA the Triton kernels run in Triton's CPU
interpreter, which must be switched on before anything imports triton (``import moh`` imports
transformers, which imports triton; a triton imported without the interpreter decorates its own
``tl`` helpers as compiled functions, and every interpreted kernel then fails)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for every test: CI's two cores also run the tests' subprocesses, and
    oversubscribed threads spin. Tests that time or need more threads set their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
