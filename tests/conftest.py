"""Shared pytest setup: deterministic, single-threaded-friendly defaults for a 2-core machine."""
import os

import pytest
import torch

# Two cores: keep intra-op threads from oversubscribing when pytest and papermill kernels run together.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    """Start-ahead notebook jobs for the collected notebook tests (tests/nbharness.py); skip tests marked `gpu`
    when no CUDA device is present (they are counted as skipped, not passed)."""
    from tests.markdown_claims import notebook_size
    from tests.nbharness import POOL, notebook_jobs

    POOL.select(((item.module.__name__, item.originalname) for item in items
                 if getattr(item, "module", None) is not None), notebook_jobs(notebook_size()))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus):
    """Cancel notebook jobs that no test will read (after -x, a failure or Ctrl-C); when every test passed, delete
    the notebook runs' temporary folders (about 90 MB each; kept after a failure, to read the executed copies)."""
    from tests.nbharness import POOL, remove_work_dirs

    POOL.shutdown()
    if exitstatus == pytest.ExitCode.OK:
        remove_work_dirs()


@pytest.fixture(scope="module")
def one_thread():
    """One compute thread for a module: tiny evaluations and fusion calls only lose from a second OpenMP
    thread on a shared 2-core machine. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
