"""The loss terms of CODIS (L_align, L_itm, L_mlm) as pure functions of features, logits and targets.

This layer sits between the codebook (L_code, L_ot live in `codis_lib.codebook`) and the model: it
knows nothing about encoders, so every term can be checked on hand-made tensors. `CODIS.forward`
encodes, calls these functions and adds the weighted results.

- Alignment: `clip_alignment` (in-batch, one-hot targets over the global batch) and
  `distilled_alignment` (ALBEF's momentum distillation over batch + queue columns; the cross-modal
  pair i2t, t2i and, for CODIS, the unimodal pair i2i, t2t), both on `positive_targets`.
- ITM: `sample_hard_negatives` draws ALBEF's hard negatives from `hard_negative_weights`, `itm_pairs`
  forms the 3B pairs, `itm_loss_from_logits` scores them; `image_text_matching` does all three around a
  scoring callable.
- MLM: `mlm_loss_from_logits` is ALBEF's (1 - alpha) CE + alpha D over the masked tokens, averaged over
  the masked tokens of the global batch (`global_token_count`).

Per-sample random streams (`sample_generator`) make the hard-negative draws and the MLM masking of a
sample depend on its seed only, not on how the global batch is split over processes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from codis_lib.codebook import soft_cross_entropy  # the one soft-target cross-entropy
from codis_lib.distributed import (all_gather_no_grad, all_gather_with_grad, all_reduce_sum_, get_world_size,
                                   is_distributed)

__all__ = ["float32_region", "soft_cross_entropy", "positive_targets", "distilled_contrast", "AlignmentLosses",
           "clip_alignment", "distilled_alignment", "sample_generator", "hard_negative_weights",
           "sample_hard_negatives", "hard_negative_similarities", "ITMPairs", "ITMLosses", "itm_pairs",
           "itm_loss_from_logits", "image_text_matching", "MLMLosses", "global_token_count", "mlm_loss_from_logits"]

# The scoring callable of ITM: (image_embeds (n, N, D), text_embeds (n, L, D), mask (n, L)) -> logits (n, 2).
PairScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def float32_region(device: torch.device) -> torch.autocast:
    """Return a context that switches autocast off: contrastive and OT math stays in float32.

    Contrastive logits are divided by tau ~ 0.07 and Sinkhorn by eps = 0.05, too sharp for bf16/fp16.
    """
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------- alignment
def positive_targets(batch: int, global_batch: int, offset: int, *, image_ids: torch.Tensor | None = None,
                     ids_all: torch.Tensor | None = None, queue_ids: torch.Tensor | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """Return the ground-truth target rows (B, Bg [+ Q]), each summing to 1.

    Without image ids row i's target is the paired column offset + i (one-hot). With image_ids (B,)
    and ids_all (Bg,) the mass is spread evenly over every column of the same image, queue columns
    included. queue_ids (Q,): the ids of the queue entries (-100: none); given, the rows also cover
    the Q queue columns, which are never positives without image ids.
    """
    if image_ids is None:
        width = global_batch + (queue_ids.numel() if queue_ids is not None else 0)
        targets = torch.zeros(batch, width, device=device)
        targets[torch.arange(batch, device=device), offset + torch.arange(batch, device=device)] = 1.0
        return targets
    if ids_all is None:
        raise ValueError("positive_targets: image_ids need ids_all, the image ids of the global batch")
    columns = torch.cat([ids_all, queue_ids]) if queue_ids is not None else ids_all  # (Bg [+ Q],)
    same = (image_ids[:, None] == columns[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def distilled_contrast(student_rows: torch.Tensor, teacher_rows: torch.Tensor, columns: torch.Tensor,
                       positives: torch.Tensor, alpha: float, temp: torch.Tensor,
                       student_columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (H, sim): soft-target cross-entropy of student rows against teacher columns, and sim (B, C).

    sim = z_s [z_u^m ; queue_u] / tau; targets = alpha softmax(z_s^m [z_u^m ; queue_u] / tau)
    + (1 - alpha) positives (the paper's L_align). columns: (d, C) unit teacher features.
    student_columns (d, Bg), with gradient: when given, the student rows are scored against these in
    place of the first Bg (global-batch) teacher columns, as CLIP scores them; the targets still come
    from the teacher against its own columns (`ModelConfig.align_columns = "student"`).
    """
    if student_columns is not None:
        columns_scored = torch.cat([student_columns, columns[:, student_columns.shape[1]:]], dim=1)
    else:
        columns_scored = columns
    sim = student_rows @ columns_scored / temp  # (B, C)
    with torch.no_grad():
        sim_teacher = teacher_rows @ columns / temp
        targets = alpha * F.softmax(sim_teacher, dim=1) + (1 - alpha) * positives
    return soft_cross_entropy(sim, targets), sim


@dataclass
class AlignmentLosses:
    """L_align of one batch: the cross-modal mean, the unimodal mean (CODIS only) and each term."""

    itc: torch.Tensor  # (H_i2t + H_t2i) / 2, ALBEF's image-text contrastive loss
    unimodal: torch.Tensor | None  # (H_i2i + H_t2t) / 2; None when the unimodal pair is off
    terms: dict[str, torch.Tensor]  # H per direction: i2t, t2i [, i2i, t2t]
    sims: dict[str, torch.Tensor]  # the student logits of each direction, (B, Bg [+ Q]), already / tau

    @property
    def total(self) -> torch.Tensor:
        """Return L_align unweighted: itc, plus unimodal when that pair is on."""
        return self.itc if self.unimodal is None else self.itc + self.unimodal


def clip_alignment(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor, *, offset: int,
                   image_ids: torch.Tensor | None = None) -> AlignmentLosses:
    """Return CLIP's symmetric in-batch contrastive loss over the global batch, student features only.

    image_feat, text_feat: this rank's unit features (B, d); the columns are the features of the global
    batch, gathered with gradient. Targets are one-hot, or spread over shared image ids.
    """
    image_all = all_gather_with_grad(image_feat)  # (Bg, d)
    text_all = all_gather_with_grad(text_feat)
    ids_all = all_gather_no_grad(image_ids) if image_ids is not None else None
    targets = positive_targets(image_feat.shape[0], image_all.shape[0], offset, image_ids=image_ids,
                               ids_all=ids_all, device=image_feat.device)  # (B, Bg)
    sim_i2t = image_feat @ text_all.t() / temp
    sim_t2i = text_feat @ image_all.t() / temp
    loss_i2t, loss_t2i = soft_cross_entropy(sim_i2t, targets), soft_cross_entropy(sim_t2i, targets)
    return AlignmentLosses(itc=(loss_i2t + loss_t2i) / 2, unimodal=None, terms={"i2t": loss_i2t, "t2i": loss_t2i},
                           sims={"i2t": sim_i2t, "t2i": sim_t2i})


def distilled_alignment(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_teacher: torch.Tensor,
                        text_feat_teacher: torch.Tensor, image_columns: torch.Tensor, text_columns: torch.Tensor,
                        positives: torch.Tensor, alpha: float, temp: torch.Tensor, *,
                        unimodal: bool, student_columns: bool = False) -> AlignmentLosses:
    """Return L_align with momentum distillation: i2t and t2i, plus i2i and t2t when `unimodal`.

    image_feat, text_feat: student features (B, d); *_teacher: the teacher's features of the same rows;
    image_columns, text_columns: (d, Bg + Q) teacher features of the global batch and the queue;
    positives: (B, Bg + Q) from `positive_targets`. student_columns: i2t and t2i score the global batch's
    student features (gathered with gradient) instead of the teacher's; the queue and the targets stay
    the teacher's, and i2i / t2t keep teacher columns (a student column would be the row itself).
    """
    terms, sims = {}, {}
    image_all = all_gather_with_grad(image_feat).t() if student_columns else None  # (d, Bg)
    text_all = all_gather_with_grad(text_feat).t() if student_columns else None
    pairs = [("i2t", image_feat, image_feat_teacher, text_columns, text_all),
             ("t2i", text_feat, text_feat_teacher, image_columns, image_all)]
    if unimodal:
        pairs += [("i2i", image_feat, image_feat_teacher, image_columns, None),
                  ("t2t", text_feat, text_feat_teacher, text_columns, None)]
    for name, student_rows, teacher_rows, columns, own_columns in pairs:
        terms[name], sims[name] = distilled_contrast(student_rows, teacher_rows, columns, positives, alpha, temp,
                                                     student_columns=own_columns)
    itc = (terms["i2t"] + terms["t2i"]) / 2
    return AlignmentLosses(itc=itc, unimodal=(terms["i2i"] + terms["t2t"]) / 2 if unimodal else None, terms=terms,
                           sims=sims)


# ---------------------------------------------------------------------------------------- ITM
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


# ---------------------------------------------------------------------------------------- MLM
class MLMLosses(NamedTuple):
    """L_mlm = (1 - alpha) CE + alpha D, with CE, D and the masked-token accuracy (all but loss detached)."""

    loss: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor
    accuracy: torch.Tensor


def global_token_count(positions: torch.Tensor) -> torch.Tensor:
    """Return the masked-token count to divide this rank's token sums by: global count / world size.

    DDP averages gradients over processes, so dividing by this gives the mean over the masked tokens of
    the global batch, independent of how the batch is split. In one process it is the plain count.
    """
    count = positions.sum().float()
    if is_distributed():
        count = all_reduce_sum_(count.clone()) / get_world_size()
    return count


def mlm_loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, *, alpha: float,
                         teacher_logits: torch.Tensor | None = None) -> MLMLosses:
    """Return ALBEF's MLM loss (1 - alpha) CE + alpha D over M masked tokens, with its parts.

    logits (M, V): the student's MLM logits at the masked positions; targets (M,): the original ids;
    count: from `global_token_count`. CE = sum of token cross-entropies / count. D = sum over tokens of
    -sum_v softmax(teacher_logits) log softmax(logits), / count; without teacher logits or at alpha = 0
    the loss is CE and D is reported as 0.
    """
    ce = F.cross_entropy(logits, targets, reduction="sum") / count
    accuracy = (logits.detach().argmax(dim=1) == targets).float().mean()
    if alpha == 0 or teacher_logits is None:
        return MLMLosses(ce, ce.detach(), torch.zeros_like(ce).detach(), accuracy)
    with torch.no_grad():
        soft_labels = F.softmax(teacher_logits.float(), dim=-1)  # (M, V)
    distill = -(soft_labels * F.log_softmax(logits, dim=-1)).sum() / count
    return MLMLosses((1 - alpha) * ce + alpha * distill, ce.detach(), distill.detach(), accuracy)
