import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the machine's cores are shared, and oversubscribed threads spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
