"""ALBEF MLM masking: 15 % of real non-CLS tokens; 80 % [MASK], 10 % random, 10 % kept; per-sample seeds."""
from __future__ import annotations

import math

import pytest
import torch

from codis_lib.model.masking import mask_tokens

PAD, CLS, MASK, VOCAB = 0, 2, 4, 1000
KW = dict(vocab_size=VOCAB, mask_token_id=MASK, pad_token_id=PAD, cls_token_id=CLS)


def _batch(rows: int = 4000, length: int = 30, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (rows, length), generator=gen)
    ids[:, 0] = CLS
    lengths = torch.randint(5, length + 1, (rows,), generator=gen)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = PAD
    return ids


def _within(observed: int, trials: int, p: float, sigmas: float = 5.0) -> bool:
    """Return True when a binomial count is within `sigmas` standard deviations of its mean."""
    return abs(observed - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p))


@pytest.mark.parametrize("seeded", [False, True])
def test_rates_within_sampling_error(seeded):
    ids = _batch()
    torch.manual_seed(1)
    seeds = torch.arange(ids.shape[0]) if seeded else None
    masked, labels = mask_tokens(ids, sample_seeds=seeds, draw_length=32 if seeded else None, **KW)
    eligible = (ids != PAD) & (ids != CLS)
    chosen = labels != -100
    assert not (chosen & ~eligible).any(), "padding or [CLS] was chosen"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen]), "unchosen tokens must stay"
    n_eligible, n_chosen = int(eligible.sum()), int(chosen.sum())
    assert _within(n_chosen, n_eligible, 0.15)
    to_mask = int((masked[chosen] == MASK).sum())
    kept = int((masked[chosen] == ids[chosen]).sum())
    assert _within(to_mask, n_chosen, 0.8)
    # "kept" includes the 1/VOCAB chance that a random replacement equals the original token.
    assert _within(kept, n_chosen, 0.1 + 0.1 / VOCAB)
    assert _within(n_chosen - to_mask - kept, n_chosen, 0.1 - 0.1 / VOCAB)


def test_per_sample_seeds_ignore_batch_split_and_padding():
    ids = _batch(rows=8, length=20, seed=3)
    seeds = torch.arange(100, 108)
    full = mask_tokens(ids, sample_seeds=seeds, draw_length=40, **KW)
    halves = [mask_tokens(ids[part], sample_seeds=seeds[part], draw_length=40, **KW)
              for part in (slice(0, 3), slice(3, 8))]
    for full_part, half_part in zip(full, ([torch.cat([halves[0][i], halves[1][i]]) for i in range(2)])):
        assert torch.equal(full_part, half_part)
    # Padding the batch to a longer length leaves every real position's outcome unchanged.
    longer = torch.cat([ids, torch.zeros(8, 6, dtype=torch.long)], dim=1)
    masked_long, labels_long = mask_tokens(longer, sample_seeds=seeds, draw_length=40, **KW)
    assert torch.equal(masked_long[:, :20], full[0]) and torch.equal(labels_long[:, :20], full[1])
    # Different seeds give a different corruption (so the seeds matter).
    other = mask_tokens(ids, sample_seeds=seeds + 1000, draw_length=40, **KW)
    assert not torch.equal(other[1], full[1])


def test_bad_arguments_are_named():
    ids = _batch(rows=2, length=10)
    with pytest.raises(ValueError, match="sample_seeds must be an int64 tensor of shape"):
        mask_tokens(ids, sample_seeds=torch.arange(3), **KW)
    with pytest.raises(ValueError, match="draw_length 5 is shorter"):
        mask_tokens(ids, sample_seeds=torch.arange(2), draw_length=5, **KW)
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, mlm_probability=1.5, **KW)
