"""Small wrappers over torch.distributed that are no-ops in a single process.

Everything in CODIS that must see the *global* batch (Sinkhorn marginals, queue refresh, contrastive
columns, hard negatives) goes through these helpers, so the same code runs on a laptop without a
process group and under torchrun with DistributedDataParallel.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Return True when a process group is initialised (e.g. under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Return this process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Return the number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Return True on rank 0 (and always in a single process)."""
    return get_rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor` summed in place over all ranks (unchanged without a process group)."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor` replaced in place by its element-wise maximum over all ranks."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Return the concatenation over ranks (in rank order) of `tensor` along dim 0, without gradient.

    Every rank must pass a tensor of the same shape (as DistributedSampler with drop_last gives).
    """
    if not (is_distributed() and get_world_size() > 1):
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size = get_world_size()
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        ctx.local_batch = tensor.shape[0]
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on every slice; the local slice's gradient is the sum of all
        # ranks' contributions. DDP later averages parameter gradients, which makes the total the
        # gradient of the mean of the per-rank losses, i.e. of the loss over the global batch.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.local_batch
        return grad[start:start + ctx.local_batch]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Return the concatenation over ranks of `tensor` along dim 0, differentiable w.r.t. the local slice."""
    if not (is_distributed() and get_world_size() > 1):
        return tensor
    return _AllGatherWithGrad.apply(tensor)
