"""Shared pytest setup: deterministic, single-threaded-friendly defaults for a 2-core machine."""
import os

import pytest
import torch

# Two cores: keep intra-op threads from oversubscribing when pytest and papermill kernels run together.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is present (they are counted as skipped, not passed)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
