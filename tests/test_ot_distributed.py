"""Sinkhorn over a global batch split across two gloo processes equals the single-process plan."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codis_lib.ot import sinkhorn
from tests.helpers import free_port

pytestmark = pytest.mark.slow  # spawns two gloo processes


def _worker(rank: int, world_size: int, port: int, scores: torch.Tensor, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        local = scores.chunk(world_size, dim=0)[rank]
        results = {
            "plain": sinkhorn(local, 0.05, 3),
            "log": sinkhorn(local, 0.05, 3, log_domain=True),
            "converged": sinkhorn(local, 0.05, None, tol=1e-10),
            "local_only": sinkhorn(local, 0.05, 3, distributed=False),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_plan_equals_single_process_plan_on_the_concatenated_batch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feat = torch.nn.functional.normalize(torch.randn(24, 8, generator=gen, dtype=torch.float64), dim=1)
    codes = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=1)
    scores = feat @ codes.t()  # (24, 6)
    mp.start_processes(_worker, args=(2, free_port(), scores, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, kwargs in (("plain", {}), ("log", {"log_domain": True}), ("converged", {"n_iters": None, "tol": 1e-10})):
        distributed = torch.cat([p[key] for p in parts])
        n_iters = kwargs.pop("n_iters", 3)
        single = sinkhorn(scores, 0.05, n_iters, **kwargs)
        torch.testing.assert_close(distributed, single, atol=1e-12, rtol=0, msg=f"{key} plan differs")
    # Without the all-reduce each half is balanced on its own: a different plan, so the test can fail.
    local_only = torch.cat([p["local_only"] for p in parts])
    assert (local_only - sinkhorn(scores, 0.05, 3)).abs().max() > 1e-3
