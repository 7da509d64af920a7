"""L_itm: image-text matching on B positive pairs and 2B hard negatives drawn from the global batch (ALBEF).

Each text draws a negative image from softmax(sim_t2i) and each image a negative text from
softmax(sim_i2t), never its own pair nor (in fine-tuning) a sample of the same image:
`hard_negative_similarities` -> `hard_negative_weights` -> `sample_hard_negatives`. `itm_pairs` forms
the 3B pairs, a scoring callable (the fusion encoder + itm_head) scores them and `itm_loss_from_logits`
is the cross-entropy; `image_text_matching` does all of it around that callable.

Per-sample random streams (`sample_generator`) make the draws of a sample depend on its seed only, not
on how the global batch is split over processes; the MLM masking (`codis_lib.model.masking`) draws from
the same kind of stream.
"""
from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from codis_lib.distributed import all_gather_no_grad, all_gather_with_grad
from codis_lib.objectives.alignment import float32_region

__all__ = ["PairScorer", "sample_generator", "hard_negative_weights", "sample_hard_negatives",
           "hard_negative_similarities", "ITMPairs", "ITMLosses", "itm_pairs", "itm_loss_from_logits",
           "image_text_matching"]

# The scoring callable of ITM: (image_embeds (n, N, D), text_embeds (n, L, D), mask (n, L)) -> logits (n, 2).
PairScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_generator(seed: int, stream: str) -> torch.Generator:
    """Return a CPU generator seeded from (seed, stream); the same pair always gives the same stream.

    Different stream names ("mlm", "itm_image", ...) give independent streams from one per-sample seed.
    """
    digest = hashlib.blake2b(f"{stream}:{int(seed)}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def _draw_from_weights(weights: torch.Tensor, sample_seeds: torch.Tensor | None, stream: str,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Return one column index per row (B,) drawn from the non-negative row weights (B, C).

    Without sample_seeds: `torch.multinomial`, from `generator` (None: the global generator).
    """
    if sample_seeds is None:
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)
    uniforms = torch.stack([torch.rand(1, generator=sample_generator(int(seed), stream))
                            for seed in sample_seeds.tolist()]).to(weights.device)  # (B, 1)
    cumulative = weights.double().cumsum(dim=1)  # (B, C)
    # The first column whose cumulative weight exceeds u * total; zero-weight columns never qualify.
    index = (cumulative <= uniforms.double() * cumulative[:, -1:]).sum(dim=1)
    return index.clamp_max(weights.shape[1] - 1)


@torch.no_grad()
def hard_negative_weights(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, offset: int = 0,
                          image_ids: torch.Tensor | None = None,
                          ids_all: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weights_t2i, weights_i2t), (B, Bg) float32 rows summing to 1: what the hard negatives are drawn from.

    Row i is softmax(sim) over the global batch with the paired column offset + i removed and, when image
    ids are given (ids_all: (Bg,) ids of the global batch), every column of the same image removed too.
    Arguments as `sample_hard_negatives`, which draws from these rows.
    """
    batch = sim_i2t.shape[0]
    rows = torch.arange(batch, device=sim_i2t.device)
    forbidden = torch.zeros_like(sim_i2t, dtype=torch.bool)  # (B, Bg)
    forbidden[rows, offset + rows] = True
    if image_ids is not None:
        forbidden |= image_ids[:, None] == ids_all[None, :]
    if bool(forbidden.all(dim=1).any()):
        raise ValueError("ITM hard negatives: a sample has no negative in the global batch (every sample shares its "
                         "image_id, or the batch has one sample); shuffle the data or enlarge the batch")
    # softmax after masking = ALBEF's zeroing of the positive followed by multinomial's renormalisation,
    # but it cannot underflow to an all-zero row.
    weights_t2i = F.softmax(sim_t2i.float().masked_fill(forbidden, float("-inf")), dim=1)
    weights_i2t = F.softmax(sim_i2t.float().masked_fill(forbidden, float("-inf")), dim=1)
    return weights_t2i, weights_i2t


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, offset: int = 0,
                          image_ids: torch.Tensor | None = None, ids_all: torch.Tensor | None = None,
                          sample_seeds: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (negative_image (B,), negative_text (B,)): global-batch indices of ALBEF's hard negatives.

    sim_i2t, sim_t2i: (B, Bg) similarities of this rank's B rows to the global batch, whose row i is
    paired with column offset + i. Each text draws a negative image from softmax(sim_t2i) and each
    image a negative text from softmax(sim_i2t), never the paired column and, when image ids are
    given (ids_all: (Bg,) ids of the global batch), never a sample of the same image
    (`hard_negative_weights`). The images are drawn first, then the texts.
    sample_seeds (B,): draw row i from its own stream, so results do not depend on the batch split.
    generator: without sample_seeds, the generator `torch.multinomial` draws from (None: the global one).
    """
    weights_t2i, weights_i2t = hard_negative_weights(sim_i2t, sim_t2i, offset, image_ids, ids_all)
    negative_image = _draw_from_weights(weights_t2i, sample_seeds, "itm_image", generator)  # one image per text
    negative_text = _draw_from_weights(weights_i2t, sample_seeds, "itm_text", generator)  # one text per image
    return negative_image, negative_text


@torch.no_grad()
def hard_negative_similarities(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_teacher_all: torch.Tensor,
                               text_feat_teacher_all: torch.Tensor,
                               temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sim_i2t, sim_t2i), (B, Bg) each: student rows against the teacher features of the global batch.

    ALBEF draws its hard negatives from these student-to-teacher similarities (float32, no gradient).
    """
    with float32_region(image_feat.device):
        return image_feat @ text_feat_teacher_all.t() / temp, text_feat @ image_feat_teacher_all.t() / temp


class ITMPairs(NamedTuple):
    """The 3B pairs that ITM scores: B positives, a hard negative image per text, a hard negative text per image."""

    image_embeds: torch.Tensor  # (3B, N, D)
    text_embeds: torch.Tensor  # (3B, L, D)
    attention_mask: torch.Tensor  # (3B, L)
    labels: torch.Tensor  # (3B,) 1 for the B positives, 0 for the 2B negatives


class ITMLosses(NamedTuple):
    """L_itm of one batch and the matching accuracy over its 3B pairs (detached)."""

    loss: torch.Tensor
    accuracy: torch.Tensor


def itm_pairs(image_embeds: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor,
              negative_image: torch.Tensor, negative_text: torch.Tensor) -> ITMPairs:
    """Return the 3B ITM pairs of this rank's B samples and their hard negatives from the global batch.

    negative_image, negative_text (B,): global-batch indices from `sample_hard_negatives`. The encoder
    states of the global batch are gathered with gradient, so a negative trains the rank it came from.
    """
    batch = image_embeds.shape[0]
    image_embeds_all = all_gather_with_grad(image_embeds)  # (Bg, N, D)
    text_embeds_all = all_gather_with_grad(text_embeds)  # (Bg, L, D)
    mask_all = all_gather_no_grad(attention_mask)  # (Bg, L)
    text_cat = torch.cat([text_embeds, text_embeds, text_embeds_all[negative_text]])  # (3B, L, D)
    mask_cat = torch.cat([attention_mask, attention_mask, mask_all[negative_text]])
    image_cat = torch.cat([image_embeds, image_embeds_all[negative_image], image_embeds])  # (3B, N, D)
    labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
    return ITMPairs(image_cat, text_cat, mask_cat, labels.to(image_embeds.device))


def itm_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> ITMLosses:
    """Return (L_itm, accuracy): cross-entropy of the matching logits (n, 2) against labels (n,), column 1 = match."""
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return ITMLosses(loss, accuracy)


def image_text_matching(score_pairs: PairScorer, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                        attention_mask: torch.Tensor, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, *, offset: int,
                        image_ids: torch.Tensor | None = None, ids_all: torch.Tensor | None = None,
                        sample_seeds: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> ITMLosses:
    """Return (L_itm, accuracy) of B positives and 2B hard negatives scored by `score_pairs`.

    score_pairs(image_embeds, text_embeds, mask) -> (n, 2) logits, e.g. the fusion encoder + itm_head.
    sim_i2t, sim_t2i: (B, Bg) from `hard_negative_similarities`; other arguments as `sample_hard_negatives`.
    """
    negative_image, negative_text = sample_hard_negatives(sim_i2t, sim_t2i, offset, image_ids, ids_all,
                                                          sample_seeds, generator)
    pairs = itm_pairs(image_embeds, text_embeds, attention_mask, negative_image, negative_text)
    logits = score_pairs(pairs.image_embeds, pairs.text_embeds, pairs.attention_mask)  # (3B, 2)
    return itm_loss_from_logits(logits, pairs.labels)
