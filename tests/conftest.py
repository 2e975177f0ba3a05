import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests are timed on 2-core machines: one torch thread, set deliberately."""
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(1)
    yield
