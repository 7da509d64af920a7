"""ALBEF's masked-language-modelling corruption, with optional per-sample random streams.

ALBEF (model_pretrain.py, `mask`): each token is chosen with probability 0.15, except padding and
[CLS]; a chosen token becomes [MASK] with probability 0.8, otherwise (probability 0.5 of the rest,
i.e. 10 % overall) a random id drawn uniformly from the whole vocabulary, otherwise it stays (10 %).
Labels hold the original id at chosen positions and -100 (ignored by cross-entropy) elsewhere.

Per-sample seeds make the corruption of a caption depend only on that caption's seed: row i draws
from its own `torch.Generator` seeded from `sample_seeds[i]`, with fixed-length draws
(`draw_length`, the model's maximum text length) so that neither the batch composition nor the
padded length of the batch changes what a sample gets. Under torchrun this makes a step's
randomness independent of how the global batch is split over processes.
"""
from __future__ import annotations

import torch

from codis_lib.objectives.itm import sample_generator  # the per-sample streams, shared with the ITM draws

__all__ = ["mask_tokens", "sample_generator"]


def _check_seeds(sample_seeds: torch.Tensor, batch: int, name: str = "sample_seeds") -> list[int]:
    """Return the seeds as Python ints after checking their shape and dtype."""
    if not isinstance(sample_seeds, torch.Tensor) or sample_seeds.shape != (batch,):
        shape = tuple(sample_seeds.shape) if isinstance(sample_seeds, torch.Tensor) else type(sample_seeds).__name__
        raise ValueError(f"{name} must be an int64 tensor of shape (B,) = ({batch},), got {shape}")
    if sample_seeds.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor, got dtype {sample_seeds.dtype}")
    return [int(s) for s in sample_seeds.tolist()]


def mask_tokens(input_ids: torch.Tensor, *, vocab_size: int, mask_token_id: int, pad_token_id: int,
                cls_token_id: int, mlm_probability: float = 0.15, sample_seeds: torch.Tensor | None = None,
                draw_length: int | None = None, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked_input_ids, labels), both (B, L) int64, corrupted as ALBEF's MLM.

    input_ids: (B, L) token ids. sample_seeds: optional (B,) seeds, one random stream per row.
    draw_length: length of each row's draws when seeded (>= L; defaults to L, pass the model's
    max_position_embeddings to make results independent of the batch's padded length).
    generator: optional generator for the unseeded path (default: the global RNG of the device).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    batch, length = input_ids.shape
    device = input_ids.device
    if sample_seeds is not None:
        seeds = _check_seeds(sample_seeds, batch)
        draw_length = length if draw_length is None else draw_length
        if draw_length < length:
            raise ValueError(f"draw_length {draw_length} is shorter than the batch's text length {length}")
        draws = []
        for seed in seeds:
            row_generator = sample_generator(seed, "mlm")
            uniforms = torch.rand(3, draw_length, generator=row_generator)  # (3, Lmax): choose, [MASK]?, random?
            random_ids = torch.randint(vocab_size, (draw_length,), generator=row_generator)
            draws.append((uniforms[:, :length], random_ids[:length]))
        choose_u = torch.stack([u[0] for u, _ in draws]).to(device)  # (B, L)
        replace_u = torch.stack([u[1] for u, _ in draws]).to(device)
        random_u = torch.stack([u[2] for u, _ in draws]).to(device)
        random_ids = torch.stack([r for _, r in draws]).to(device)
    else:
        gen_device = generator.device if generator is not None else device
        choose_u, replace_u, random_u = torch.rand(3, batch, length, generator=generator, device=gen_device).to(device)
        random_ids = torch.randint(vocab_size, (batch, length), generator=generator, device=gen_device).to(device)

    chosen = choose_u < mlm_probability  # Bernoulli(0.15)
    chosen &= (input_ids != pad_token_id) & (input_ids != cls_token_id)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    to_mask = chosen & (replace_u < 0.8)  # 80 % of the chosen -> [MASK]
    to_random = chosen & ~to_mask & (random_u < 0.5)  # half of the remaining 20 % -> random id
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random]
    return masked, labels
