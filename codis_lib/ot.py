"""Entropic optimal transport between a batch of features and a codebook (Sinkhorn-Knopp).

CODIS (docs/METHOD.md, "Optimal transport plans") assigns the B teacher features of a batch to the K codes
with an *equal-partition* constraint: every sample sends mass 1/B, every code receives mass 1/K. The
entropic solution has the form

    P = diag(a) . exp(S / eps) . diag(b)          S: (B, K) similarity scores

and Sinkhorn-Knopp alternates between fixing the code marginals (update b) and the sample marginals
(update a). SwAV's reference loop rescales the whole B x K matrix in place twice per iteration; here
only the two scaling vectors change, so each iteration is two matrix-vector products and the plan is
formed once at the end. Both give the same plan (tests check this against `sinkhorn_reference`, SwAV's
loop written out plainly, and against POT).

In a distributed run the sample axis is split over processes. The code marginals are sums over the
*global* batch, so they are all-reduced; the result equals the single-process plan on the
concatenated batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from codis_lib.distributed import all_reduce_max_, all_reduce_sum_, is_distributed

__all__ = ["sinkhorn", "sinkhorn_log", "ot_cost", "SinkhornResult", "sinkhorn_with_info", "sinkhorn_reference"]


def _check_inputs(scores: torch.Tensor, eps: float, n_iters: int | None, tol: float | None) -> None:
    """Raise a ValueError naming the offending argument when the Sinkhorn inputs are unusable."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor of shape (B, K), got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, K) (samples x codes), got shape {tuple(scores.shape)}")
    batch, codes = scores.shape
    if batch == 0:
        raise ValueError("scores has B = 0 samples (shape[0] == 0); Sinkhorn needs at least one sample")
    if codes == 0:
        raise ValueError("scores has K = 0 codes (shape[1] == 0); Sinkhorn needs at least one code")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (the entropic regularisation), got {eps!r}")
    if n_iters is not None and (isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1):
        raise ValueError(f"n_iters must be a positive integer, got {n_iters!r}")
    if tol is not None and (not isinstance(tol, (int, float)) or not tol > 0):
        raise ValueError(f"tol must be a number > 0 (marginal error at which to stop), got {tol!r}")
    if n_iters is None and tol is None:
        raise ValueError("give n_iters (a fixed number of iterations) or tol (run to convergence), or both")


@dataclass
class SinkhornResult:
    """A plan with each row summing to 1, the iterations run and the final code-marginal error."""

    plan: torch.Tensor  # (B, K) float32, rows sum to 1
    n_iters: int
    marginal_error: float  # L2 distance of the mass-1 plan's code marginal from uniform 1/K


def _reject_nan_and_posinf(scores: torch.Tensor) -> None:
    """Return None if no score is NaN or +inf (one aminmax pass); raise a ValueError counting them otherwise.

    -inf is allowed: a score of -inf (an infinite cost) forbids that (sample, code) pair, which then
    gets no mass, as in POT.
    """
    low, high = torch.aminmax(scores)  # NaN propagates to both; +inf shows up in the max
    if bool(torch.isnan(low)) or not bool(torch.isfinite(high)):
        _raise_not_finite(scores)


def _raise_not_finite(scores: torch.Tensor) -> None:
    bad = int((torch.isnan(scores) | torch.isposinf(scores)).sum())
    raise ValueError(f"scores contains {bad} NaN or +inf value(s); Sinkhorn needs finite scores "
                     "(-inf is allowed: it forbids that pair)")


def _raise_if_all_minus_inf(scores: torch.Tensor) -> None:
    """Raise the one error both solvers give when a sample (row) or code (column) has every score -inf.

    Such a sample can send its mass nowhere (or such a code can receive none), so no plan meets the
    marginals: the plain solver's scaling vectors overflow and the log-domain one's potentials become
    +inf, and without this check the log-domain plan would be NaN. Called only once a solver's
    scaling vectors came out non-finite (one pass over the matrix, on the failure path only). The
    check looks at this process's scores: in a distributed run a code that is all -inf on this rank
    only is not named (it is not the cause there); returns None when nothing is all -inf.
    """
    forbidden = torch.isneginf(scores)
    for axis, line, meaning in ((1, "row", "that sample can be sent to no code"),
                                (0, "column", "that code can receive no sample")):
        hopeless = forbidden.all(dim=axis).nonzero()
        if len(hopeless):
            raise FloatingPointError(
                f"Sinkhorn: scores has {len(hopeless)} {line}(s) whose every score is -inf (first: {line} "
                f"{int(hopeless[0])}): {meaning}, so no plan meets the equal-partition marginals; give every "
                f"sample and every code at least one finite score")


def _code_maxima(scores: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Return each code's maximum score over the (global) batch, (K,); 0 for a code whose scores are all -inf.

    Raises if a score is NaN or +inf.
    """
    code_max = scores.amax(dim=0)  # NaN propagates
    if distributed:  # before the check, so that every rank takes part and then raises alike
        all_reduce_max_(code_max)
    if bool(torch.isnan(code_max).any()) or bool(torch.isposinf(code_max).any()):
        _raise_not_finite(scores)
    return torch.where(torch.isneginf(code_max), torch.zeros_like(code_max), code_max)


def _working_precision(scores: torch.Tensor) -> torch.Tensor:
    """Return detached scores in float32, or float64 when given float64 (bf16/fp16 are upcast)."""
    scores = scores.detach()
    return scores if scores.dtype == torch.float64 else scores.float()


def _global_batch(local_batch: int, device: torch.device, distributed: bool) -> int:
    """Return the number of samples over all ranks."""
    if not (distributed and is_distributed()):
        return local_batch
    count = torch.tensor([float(local_batch)], device=device)
    return int(all_reduce_sum_(count).item())


def _code_mass(kernel: torch.Tensor, sample_scale: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Return K^T a, (K,): the column sums of diag(a) K over the global batch."""
    code_mass = sample_scale @ kernel
    if distributed:
        all_reduce_sum_(code_mass)
    return code_mass


def _sinkhorn_plain(scores: torch.Tensor, eps: float, n_iters: int | None, tol: float | None,
                    max_iters: int, distributed: bool) -> SinkhornResult:
    """Scaling-vector Sinkhorn in the exp domain; returns rows normalised to sum to 1.

    Memory passes over the (B, K) matrix: two to build the kernel, two mat-vecs per iteration and two
    to form the plan. SwAV's in-place loop makes about seven per iteration; that difference is the
    speed-up (benchmarks/bench_sinkhorn.py). torch.compile of the same algorithm is no faster
    (`bench_sinkhorn.py --compiled`): what remains is memory traffic.
    """
    scores = _working_precision(scores)
    batch, codes = scores.shape
    global_batch = _global_batch(batch, scores.device, distributed)
    sample_scale = torch.full((batch,), 1.0 / global_batch, device=scores.device, dtype=scores.dtype)  # a: (B,)

    # Shifting the scores of a code by a constant scales its kernel column, which the first code update
    # cancels; the shift only has to keep exp() in range. The first row's maximum, one shift for all
    # codes, does that for ordinary eps at the cost of K reads instead of a pass over the matrix. If a
    # score exceeds it by more than ~88 eps (exp overflows) or a score is NaN or +inf, the code masses
    # come out non-finite and the kernel is rebuilt shifting each code by its own maximum, which never
    # overflows (that path also rejects NaN and +inf by name).
    shift = scores[0].amax()
    if distributed:
        all_reduce_max_(shift)
    kernel = torch.add(-shift / eps, scores, alpha=1.0 / eps).exp_()  # (B, K) = exp((S - shift) / eps)
    code_mass = _code_mass(kernel, sample_scale, distributed)
    if not bool(torch.isfinite(code_mass).all()):
        code_max = _code_maxima(scores, distributed)  # (K,)
        torch.sub(scores, code_max, out=kernel).div_(eps).exp_()
        code_mass = _code_mass(kernel, sample_scale, distributed)
    code_scale = torch.ones(codes, device=scores.device, dtype=scores.dtype)  # b: (K,)
    row_mass = None  # K b, (B,): the last row update's denominator
    limit = n_iters if n_iters is not None else max_iters
    done, error = 0, float("nan")
    for done in range(1, limit + 1):
        if done > 1:
            code_mass = _code_mass(kernel, sample_scale, distributed)
        if tol is not None and done > 1:
            # The plan's current code marginal is b * (K^T a); its distance to uniform is free here.
            error = float(torch.linalg.vector_norm(code_scale * code_mass - 1.0 / codes))
            if error <= tol:
                done -= 1
                break
        code_scale = 1.0 / (codes * code_mass)
        row_mass = kernel @ code_scale  # (B,)
        sample_scale = 1.0 / (global_batch * row_mass)
    if not (bool(torch.isfinite(code_scale).all()) and bool(torch.isfinite(sample_scale).all())):
        _raise_if_all_minus_inf(scores)
        raise FloatingPointError(
            f"Sinkhorn overflowed/underflowed in the exp domain at eps={eps}: exp(scores / eps) leaves "
            "some code or sample with zero mass. Use log_domain=True (sinkhorn_log) for small eps "
            "(or check for a sample or code whose scores are all -inf).")
    # Rows of diag(a) K diag(b) scaled to sum to 1: K_ik b_k / (K b)_i, formed in place in two passes.
    plan = kernel.mul_(code_scale).div_(row_mass[:, None])
    if tol is not None and math.isnan(error):
        error = _code_marginal_error(plan, global_batch, distributed)
    return SinkhornResult(plan=plan, n_iters=done, marginal_error=error)


def _logsumexp_over_samples(log_terms: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Return log(sum over the global batch of exp(log_terms)) per code, (K,), stable across ranks."""
    if not (distributed and is_distributed()):
        return torch.logsumexp(log_terms, dim=0)
    peak = log_terms.max(dim=0).values
    all_reduce_max_(peak)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(log_terms - peak).sum(dim=0)
    all_reduce_sum_(total)
    return torch.log(total) + peak


def _sinkhorn_log(scores: torch.Tensor, eps: float, n_iters: int | None, tol: float | None,
                  max_iters: int, distributed: bool) -> SinkhornResult:
    """Log-domain Sinkhorn: the same iterations on log-potentials, finite for tiny eps."""
    scores = _working_precision(scores)
    _reject_nan_and_posinf(scores)
    log_kernel = scores / eps  # (B, K)
    batch, codes = log_kernel.shape
    global_batch = _global_batch(batch, log_kernel.device, distributed)
    log_sample = torch.full((batch,), -math.log(global_batch), device=log_kernel.device,
                            dtype=log_kernel.dtype)  # log a
    log_code = torch.zeros(codes, device=log_kernel.device, dtype=log_kernel.dtype)  # log b
    limit = n_iters if n_iters is not None else max_iters
    done, error = 0, float("nan")
    for done in range(1, limit + 1):
        log_code_mass = _logsumexp_over_samples(log_kernel + log_sample[:, None], distributed)  # (K,)
        if tol is not None and done > 1:
            error = float(torch.linalg.vector_norm(torch.exp(log_code + log_code_mass) - 1.0 / codes))
            if error <= tol:
                done -= 1
                break
        log_code = -math.log(codes) - log_code_mass
        log_sample = -math.log(global_batch) - torch.logsumexp(log_kernel + log_code[None, :], dim=1)
    if not (bool(torch.isfinite(log_code).all()) and bool(torch.isfinite(log_sample).all())):
        _raise_if_all_minus_inf(scores)  # the only way finite or -inf scores make a potential non-finite
        raise FloatingPointError(f"log-domain Sinkhorn produced non-finite potentials at eps={eps}")
    plan = torch.softmax(log_kernel + log_code[None, :], dim=1)  # rows sum to 1
    if tol is not None and math.isnan(error):
        error = _code_marginal_error(plan, global_batch, distributed)
    return SinkhornResult(plan=plan, n_iters=done, marginal_error=error)


def _code_marginal_error(plan: torch.Tensor, global_batch: int, distributed: bool) -> float:
    """Return the L2 distance between the mass-1 plan's code marginal and uniform 1/K."""
    code_mass = plan.sum(dim=0) / global_batch
    if distributed:
        all_reduce_sum_(code_mass)
    return float(torch.linalg.vector_norm(code_mass - 1.0 / plan.shape[1]))


@torch.no_grad()
def sinkhorn_with_info(scores: torch.Tensor, eps: float = 0.05, n_iters: int | None = 3, *,
                       tol: float | None = None, max_iters: int = 10_000, log_domain: bool = False,
                       distributed: bool = True) -> SinkhornResult:
    """Return the Sinkhorn plan (rows sum to 1) with the iteration count and marginal error.

    scores: (B, K) similarities between samples and codes (bf16/fp16/float32 are computed in float32,
      float64 in float64). NaN and +inf raise a ValueError; -inf forbids that pair (it gets no mass).
    eps: entropic regularisation; smaller is closer to a hard assignment.
    n_iters: fixed number of iterations (SwAV/CODIS use 3). With `tol` as well, stops early once the
      code-marginal error is at most `tol`; with `n_iters=None`, runs until `tol` or `max_iters`.
    log_domain: iterate on log-potentials, finite for eps down to 0.005 and beyond.
    distributed: all-reduce the code marginals over the process group when one is initialised.
    """
    _check_inputs(scores, eps, n_iters, tol)
    solver = _sinkhorn_log if log_domain else _sinkhorn_plain
    return solver(scores, float(eps), n_iters, tol, max_iters, distributed)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, n_iters: int | None = 3, *, tol: float | None = None,
             max_iters: int = 10_000, log_domain: bool = False, distributed: bool = True) -> torch.Tensor:
    """Return the entropic transport plan (B, K), float32 (float64 for float64 scores), rows summing to 1.

    Uniform marginals: over the whole (global) batch every code receives an equal share. No gradient
    flows through the plan. See `sinkhorn_with_info` for the arguments.
    """
    return sinkhorn_with_info(scores, eps, n_iters, tol=tol, max_iters=max_iters, log_domain=log_domain,
                              distributed=distributed).plan


@torch.no_grad()
def sinkhorn_log(scores: torch.Tensor, eps: float = 0.05, n_iters: int | None = 3, **kwargs) -> torch.Tensor:
    """Return the log-domain Sinkhorn plan (B, K) with rows summing to 1 (see `sinkhorn`)."""
    return sinkhorn(scores, eps, n_iters, log_domain=True, **kwargs)


def ot_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """Return sum_{i,k} T[i,k] * cost[i,k] with T the plan rescaled to total mass 1 (scalar).

    The plan carries no gradient; the cost may (in CODIS it is 1 - z^m . c_k, which moves the codebook).
    """
    if plan.shape != cost.shape:
        raise ValueError(f"plan and cost must have the same shape, got plan {tuple(plan.shape)} "
                         f"and cost {tuple(cost.shape)}")
    plan = plan.detach().to(cost.dtype)
    return (plan * cost).sum() / plan.sum()


def sinkhorn_reference(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return the equal-partition plan (B, K), rows summing to 1, by SwAV's loop as written: the readable reference.

    The whole (K, B) matrix exp(S / eps) is rescaled in place, codes then samples, n_iters times; no
    shift, so exp overflows in float32 once a score exceeds ~88 eps. Computed in `dtype` (float64 by
    default, for checking `sinkhorn` against it; float32 for timing SwAV's loop). Single process only.
    The tests and benchmarks/bench_sinkhorn.py compare `sinkhorn` with this.
    """
    plan = torch.exp(scores.to(dtype) / eps).t()  # (K, B) as SwAV orients it
    codes, batch = plan.shape
    plan /= plan.sum()
    for _ in range(n_iters):
        plan /= plan.sum(dim=1, keepdim=True)  # every code receives 1/K
        plan /= codes
        plan /= plan.sum(dim=0, keepdim=True)  # every sample sends 1/B
        plan /= batch
    plan *= batch
    return plan.t()
