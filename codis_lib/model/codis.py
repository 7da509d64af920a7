"""The CODIS model (docs/METHOD.md): ALBEF's encoders, momentum teacher and queues, plus the codebook.

One `forward` computes every active loss term of

    L = L_align + L_code + L_ot + L_itm + L_mlm              (each with its own weight)

and returns them separately with the diagnostics a notebook wants. Parameter and buffer names
follow ALBEF's checkpoints (`visual_encoder`, `text_encoder.bert`, `text_encoder.cls`, `vision_proj`,
`text_proj`, `itm_head`, the `*_m` teacher copies, `image_queue`, `text_queue`, `queue_ptr`, `temp`),
so `albef_checkpoint.load_albef_state_dict` is a checked, key-by-key mapping.

Step order in training mode (as ALBEF's `forward`):
1. clamp the temperature to [temp_min, temp_max]; EMA-update the teacher
   (teacher = m * teacher + (1 - m) * student); re-normalise the codebook rows;
2. student features z_v, z_t and teacher features z_v^m, z_t^m; teacher features are gathered from
   all processes, so every contrastive row sees the global batch plus the queue as columns;
3. L_align, L_code + L_ot (Sinkhorn over the global batch), L_itm (hard negatives drawn from the
   global batch), L_mlm (with distillation from the teacher's MLM distribution);
4. refresh the queues FIFO with the gathered teacher features.
In eval mode steps 1 (EMA, codebook re-normalisation) and 4 are skipped, so a validation pass
leaves the model unchanged.

Modes: "clip" uses the student features only, in-batch (global batch, gathered with gradient), with
one-hot targets: no teacher, no queue, no fusion losses. "albef" is ALBEF's ITC with momentum
distillation + ITM + MLM. "codis" adds the unimodal pair (i2i, t2t) and the codebook terms.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from codis_lib.codebook import Codebook, codebook_losses, codebook_usage
from codis_lib.config import ModelConfig
from codis_lib.distributed import (all_gather_no_grad, all_gather_with_grad, all_reduce_sum_, get_rank, get_world_size,
                                   is_distributed)
from codis_lib.model.bert import TextFusionEncoder
from codis_lib.model.masking import mask_tokens, sample_generator
from codis_lib.model.vit import build_vit

__all__ = ["CODIS", "CODISOutput", "soft_cross_entropy", "sample_hard_negatives"]


@dataclass
class CODISOutput:
    """Result of one forward: weighted total, unweighted terms, and detached diagnostics."""

    loss: torch.Tensor  # scalar, sum of weighted active terms
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # keys among align, code, ot, itm, mlm
    diagnostics: dict[str, Any] = field(default_factory=dict)


def _float32(device: torch.device) -> torch.autocast:
    """Return a context that switches autocast off (contrastive and OT math stays in float32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return mean over rows of -sum_j targets[i, j] log softmax(logits)[i, j] (scalar)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def _draw_from_weights(weights: torch.Tensor, sample_seeds: torch.Tensor | None, stream: str) -> torch.Tensor:
    """Return one column index per row (B,) drawn from the non-negative row weights (B, C)."""
    if sample_seeds is None:
        return torch.multinomial(weights, 1).squeeze(1)
    uniforms = torch.stack([torch.rand(1, generator=sample_generator(int(seed), stream))
                            for seed in sample_seeds.tolist()]).to(weights.device)  # (B, 1)
    cumulative = weights.double().cumsum(dim=1)  # (B, C)
    # The first column whose cumulative weight exceeds u * total; zero-weight columns never qualify.
    index = (cumulative <= uniforms.double() * cumulative[:, -1:]).sum(dim=1)
    return index.clamp_max(weights.shape[1] - 1)


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, offset: int = 0,
                          image_ids: torch.Tensor | None = None, ids_all: torch.Tensor | None = None,
                          sample_seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (negative_image (B,), negative_text (B,)): global-batch indices of ALBEF's hard negatives.

    sim_i2t, sim_t2i: (B, Bg) similarities of this rank's B rows to the global batch, whose row i is
    paired with column offset + i. Each text draws a negative image from softmax(sim_t2i) and each
    image a negative text from softmax(sim_i2t), never the paired column and, when image ids are
    given (ids_all: (Bg,) ids of the global batch), never a sample of the same image.
    sample_seeds (B,): draw row i from its own stream, so results do not depend on the batch split.
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
    negative_image = _draw_from_weights(weights_t2i, sample_seeds, "itm_image")  # one image per text
    negative_text = _draw_from_weights(weights_i2t, sample_seeds, "itm_text")  # one text per image
    return negative_image, negative_text


class CODIS(nn.Module):
    """CODIS / ALBEF / CLIP-style model selected by `config.mode`; see the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.active = config.active_losses()
        self.weights = config.loss_weights()
        vision, text, dim = config.vision, config.text, config.embed_dim

        # Student.
        self.visual_encoder = build_vit(vision)
        self.text_encoder = TextFusionEncoder(text, encoder_width=vision.width)
        self.vision_proj = nn.Linear(vision.width, dim)
        self.text_proj = nn.Linear(text.hidden_size, dim)
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.temp = nn.Parameter(torch.ones([]) * config.temp)

        # Momentum teacher: an EMA copy of every student part that produces features or MLM logits.
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)  # deepcopy keeps the decoder tied
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for _, teacher in self.teacher_pairs():
            teacher.requires_grad_(False)

        self.codebook = Codebook(config.codebook_size, dim, temperature=config.codebook_temperature)

        # Queues of teacher features (d x Q), unit columns, and the image ids they came from (-100: none).
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, config.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, config.queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        self._freeze_unused_parts()
        self.set_gradient_checkpointing(config.gradient_checkpointing)

    # ------------------------------------------------------------------ structure
    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Return the (student, teacher) module pairs that the EMA update ties together."""
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def _freeze_unused_parts(self) -> None:
        """Set requires_grad=False on parts no active loss reaches, so DDP needs no find_unused_parameters."""
        active = self.active
        if not (active["code"] or active["ot"]):
            self.codebook.requires_grad_(False)
        if not active["itm"]:
            self.itm_head.requires_grad_(False)
        if not (active["itm"] or active["mlm"]):
            for layer in self.text_encoder.bert.encoder.layer[self.text_encoder.bert.num_text_layers:]:
                layer.requires_grad_(False)
        if not active["mlm"]:
            # The decoder weight is the word-embedding table, which the text encoder still trains.
            self.text_encoder.cls.predictions.transform.requires_grad_(False)
            self.text_encoder.cls.predictions.bias.requires_grad_(False)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute student encoder activations during backward (less memory, ~30 % more compute)."""
        self.visual_encoder.set_grad_checkpointing(enabled)
        self.text_encoder.set_gradient_checkpointing(enabled)

    # ------------------------------------------------------------------ public encoders
    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (image_embeds (B, N, D) all ViT tokens, image_feat (B, d) unit-norm projected CLS)."""
        image_embeds = self.visual_encoder.forward_features(image)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        return image_embeds, image_feat

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (text_embeds (B, L, D) text-encoder states, text_feat (B, d) unit-norm projected CLS)."""
        text_embeds = self.text_encoder.bert.forward_text(input_ids, attention_mask)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0, :]).float(), dim=-1)
        return text_embeds, text_feat

    @torch.no_grad()
    def encode_image_teacher(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the momentum teacher's (image_embeds, image_feat), without gradient."""
        image_embeds = self.visual_encoder_m.forward_features(image)
        return image_embeds, F.normalize(self.vision_proj_m(image_embeds[:, 0, :]).float(), dim=-1)

    @torch.no_grad()
    def encode_text_teacher(self, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the momentum teacher's (text_embeds, text_feat), without gradient."""
        text_embeds = self.text_encoder_m.bert.forward_text(input_ids, attention_mask)
        return text_embeds, F.normalize(self.text_proj_m(text_embeds[:, 0, :]).float(), dim=-1)

    def fusion_cls(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_attention_mask: torch.Tensor,
                   *, first_token_only: bool = True, text_self_attended: bool = False) -> torch.Tensor:
        """Return the fusion encoder's CLS state (B, D) for text states cross-attending to image tokens.

        first_token_only (default): the last fusion layer runs at [CLS] only, the one position read
          here; False runs it on every token as ALBEF does (same values up to float round-off).
        text_self_attended: text_embeds are `fusion_text_states(...)` (see BertTextFusion.forward_fusion).
        """
        fused = self.text_encoder.bert.forward_fusion(text_embeds, text_attention_mask, image_embeds,
                                                      first_token_only=first_token_only,
                                                      text_self_attended=text_self_attended)
        return fused[:, 0, :]

    def itm_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_attention_mask: torch.Tensor,
                   *, first_token_only: bool = True, text_self_attended: bool = False) -> torch.Tensor:
        """Return image-text matching logits (B, 2); column 1 is "match". Keywords as in `fusion_cls`."""
        return self.itm_head(self.fusion_cls(image_embeds, text_embeds, text_attention_mask,
                                             first_token_only=first_token_only,
                                             text_self_attended=text_self_attended))

    def fusion_text_states(self, text_embeds: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        """Return the fusion work that depends on the caption alone (B, L, D), for `text_self_attended=True`."""
        return self.text_encoder.bert.fusion_text_states(text_embeds, text_attention_mask)

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: torch.Tensor) -> torch.Tensor:
        """Return the student's MLM logits (B, L, V) on (masked) ids, with image cross-attention."""
        return self.text_encoder.mlm_logits(input_ids, attention_mask, image_embeds)

    def assign_codes(self, feat: torch.Tensor) -> torch.Tensor:
        """Return soft code probabilities (B, K) = softmax(z C^T / tau_c) for unit-norm features (B, d)."""
        codes = F.normalize(self.codebook.weight.float(), dim=1)  # (K, d); rows are unit after normalize_()
        return F.softmax(feat.float() @ codes.t() / self.codebook.temperature, dim=-1)

    # ------------------------------------------------------------------ teacher and queues
    @torch.no_grad()
    def momentum_update(self) -> None:
        """Set every teacher parameter to m * teacher + (1 - m) * student (ALBEF's _momentum_update)."""
        momentum = self.config.momentum
        student_params, teacher_params = [], []
        for student, teacher in self.teacher_pairs():
            student_params += list(student.parameters())
            teacher_params += list(teacher.parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        """Set the teacher equal to the student (ALBEF's copy_params, after loading or initialising)."""
        for student, teacher in self.teacher_pairs():
            for param, param_m in zip(student.parameters(), teacher.parameters()):
                param_m.copy_(param)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                            image_ids: torch.Tensor | None = None) -> None:
        """Write features (n, d) (already gathered from all ranks) into the queues FIFO at queue_ptr."""
        queue_size = self.image_queue.shape[1]
        count = image_feat.shape[0]
        ids = image_ids if image_ids is not None else torch.full((count,), -100, dtype=torch.long,
                                                                   device=image_feat.device)
        ptr = int(self.queue_ptr)
        if count > queue_size:  # only the newest Q survive; keep FIFO order
            ptr = (ptr + count - queue_size) % queue_size
            image_feat, text_feat, ids = image_feat[-queue_size:], text_feat[-queue_size:], ids[-queue_size:]
            count = queue_size
        slots = (ptr + torch.arange(count, device=self.image_queue.device)) % queue_size
        self.image_queue[:, slots] = image_feat.t().to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat.t().to(self.text_queue.dtype)
        self.idx_queue[0, slots] = ids.to(self.idx_queue.dtype)
        self.queue_ptr[0] = (ptr + count) % queue_size

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, alpha: float,
                image_ids: torch.Tensor | None = None, sample_seeds: torch.Tensor | None = None) -> CODISOutput:
        """Return a CODISOutput with the weighted total, each active term and the diagnostics.

        image (B, 3, H, W); input_ids, attention_mask (B, L); alpha: distillation weight in [0, 1];
        image_ids (B,): retrieval fine-tuning (positives share an id, hard negatives never do);
        sample_seeds (B,): per-sample random streams (MLM masking, ITM negative draws).
        """
        self._check_inputs(image, input_ids, attention_mask, alpha, image_ids, sample_seeds)
        config, active = self.config, self.active
        with torch.no_grad():
            self.temp.clamp_(config.temp_min, config.temp_max)
        if self.training and config.uses_teacher:
            self.momentum_update()
        if self.training and (active["code"] or active["ot"]):
            self.codebook.normalize_()

        image_embeds, image_feat = self.encode_image(image)  # (B, N, D), (B, d)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)  # (B, L, D), (B, d)
        losses: dict[str, torch.Tensor] = {}
        weighted: list[torch.Tensor] = []
        diagnostics: dict[str, Any] = {"temperature": self.temp.detach().clone()}
        batch = image.shape[0]
        offset = get_rank() * batch  # this rank's rows are global columns offset .. offset + B - 1

        if config.mode == "clip":
            with _float32(image.device):
                align = self._clip_alignment(image_feat, text_feat, image_ids, offset, diagnostics)
            losses["align"] = align
            weighted.append(self.weights["align"] * align)
            return self._finish(losses, weighted, diagnostics)

        with torch.no_grad():
            image_embeds_m, image_feat_m = self.encode_image_teacher(image)
            _, text_feat_m = self.encode_text_teacher(input_ids, attention_mask)
        image_feat_m_all = all_gather_no_grad(image_feat_m)  # (Bg, d) global batch, rank order
        text_feat_m_all = all_gather_no_grad(text_feat_m)
        ids_all = all_gather_no_grad(image_ids) if image_ids is not None else None
        global_batch = image_feat_m_all.shape[0]

        # Contrastive logits are divided by tau ~ 0.07 and Sinkhorn by eps = 0.05: keep both out of
        # bf16/fp16 autocast (the features are already float32).
        with _float32(image.device):
            if active["align"]:
                positives = self._positive_targets(batch, global_batch, offset, image_ids, ids_all,
                                                   with_queue=True, device=image_feat.device)  # (B, Bg + Q)
                image_columns = torch.cat([image_feat_m_all.t(), self.image_queue.clone().detach()], dim=1)  # (d, C)
                text_columns = torch.cat([text_feat_m_all.t(), self.text_queue.clone().detach()], dim=1)
                temp = self.temp
                terms = {
                    "i2t": self._distilled_contrast(image_feat, image_feat_m, text_columns, positives, alpha, temp),
                    "t2i": self._distilled_contrast(text_feat, text_feat_m, image_columns, positives, alpha, temp),
                }
                if active["align_unimodal"]:
                    terms["i2i"] = self._distilled_contrast(image_feat, image_feat_m, image_columns, positives, alpha,
                                                            temp)
                    terms["t2t"] = self._distilled_contrast(text_feat, text_feat_m, text_columns, positives, alpha,
                                                            temp)
                cross = (terms["i2t"][0] + terms["t2i"][0]) / 2
                align = cross
                weighted.append(self.weights["align"] * cross)
                if active["align_unimodal"]:
                    unimodal = (terms["i2i"][0] + terms["t2t"][0]) / 2
                    align = cross + unimodal
                    weighted.append(self.weights["align_unimodal"] * unimodal)
                    diagnostics["align_unimodal"] = unimodal.detach()
                losses["align"] = align
                diagnostics["align_itc"] = cross.detach()
                for name, (loss, sim) in terms.items():
                    diagnostics[f"align_{name}"] = loss.detach()
                    diagnostics[f"sim_{name}"] = sim.detach()

            if active["code"] or active["ot"]:
                parts = codebook_losses(self.codebook, image_feat, text_feat, image_feat_m, text_feat_m,
                                        eps=config.sinkhorn_eps, n_iters=config.sinkhorn_iters,
                                        log_domain=config.sinkhorn_log_domain, distributed=True)
                if active["code"]:
                    losses["code"] = parts.code
                    weighted.append(self.weights["code"] * parts.code)
                if active["ot"]:
                    losses["ot"] = parts.ot
                    weighted.append(self.weights["ot"] * parts.ot)
                diagnostics.update(code_t2p=parts.code_t2p.detach(), code_i2p=parts.code_i2p.detach(),
                                   ot_image=parts.ot_image.detach(), ot_text=parts.ot_text.detach(),
                                   assign_image=parts.image_plan.detach(), assign_text=parts.text_plan.detach())
                with torch.no_grad():
                    predictions = torch.cat([self.assign_codes(image_feat), self.assign_codes(text_feat)])  # (2B, K)
                    usage = codebook_usage(predictions)
                diagnostics["codebook_perplexity"] = usage["perplexity"]
                diagnostics["dead_codes"] = usage["dead_codes"]

        if active["itm"]:
            with torch.no_grad(), _float32(image.device):
                # ALBEF draws hard negatives from the student-to-teacher similarities of the batch.
                sim_i2t_batch = image_feat @ text_feat_m_all.t() / self.temp  # (B, Bg)
                sim_t2i_batch = text_feat @ image_feat_m_all.t() / self.temp
            itm_loss, itm_accuracy = self._itm_loss(image_embeds, text_embeds, attention_mask, sim_i2t_batch,
                                                    sim_t2i_batch, image_ids, ids_all, offset, sample_seeds)
            losses["itm"] = itm_loss
            weighted.append(self.weights["itm"] * itm_loss)
            diagnostics["itm_accuracy"] = itm_accuracy

        if active["mlm"]:
            masked_ids, labels = mask_tokens(
                input_ids, vocab_size=config.text.vocab_size, mask_token_id=config.text.mask_token_id,
                pad_token_id=config.text.pad_token_id, cls_token_id=config.text.cls_token_id,
                mlm_probability=config.mlm_probability, sample_seeds=sample_seeds,
                draw_length=config.text.max_position_embeddings)
            mlm_loss, _, _, mlm_accuracy = self.mlm_loss(masked_ids, attention_mask, labels, image_embeds,
                                                         image_embeds_m, alpha)
            losses["mlm"] = mlm_loss
            weighted.append(self.weights["mlm"] * mlm_loss)
            diagnostics["mlm_accuracy"] = mlm_accuracy

        if self.training:
            self.dequeue_and_enqueue(image_feat_m_all, text_feat_m_all, ids_all)
        return self._finish(losses, weighted, diagnostics)

    @staticmethod
    def _finish(losses: dict[str, torch.Tensor], weighted: list[torch.Tensor],
                diagnostics: dict[str, Any]) -> CODISOutput:
        """Return the CODISOutput with the total as the sum of the weighted terms."""
        total = torch.stack([w.float() for w in weighted]).sum()
        return CODISOutput(loss=total, losses=losses, diagnostics=diagnostics)

    # ------------------------------------------------------------------ loss pieces
    def _positive_targets(self, batch: int, global_batch: int, offset: int, image_ids: torch.Tensor | None,
                          ids_all: torch.Tensor | None, *, with_queue: bool, device: torch.device) -> torch.Tensor:
        """Return the ground-truth target rows (B, Bg [+ Q]) summing to 1: the paired column, or shared image ids."""
        if image_ids is None:
            width = global_batch + (self.image_queue.shape[1] if with_queue else 0)
            targets = torch.zeros(batch, width, device=device)
            targets[torch.arange(batch, device=device), offset + torch.arange(batch, device=device)] = 1.0
            return targets
        columns = torch.cat([ids_all, self.idx_queue[0]]) if with_queue else ids_all  # (Bg [+ Q],)
        same = (image_ids[:, None] == columns[None, :]).float()
        return same / same.sum(dim=1, keepdim=True)

    @staticmethod
    def _distilled_contrast(student_rows: torch.Tensor, teacher_rows: torch.Tensor, columns: torch.Tensor,
                            positives: torch.Tensor, alpha: float,
                            temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (H, sim): soft-target cross-entropy of student rows against teacher columns, and sim (B, C).

        sim = z_s [z_u^m ; queue_u] / tau; targets = alpha softmax(z_s^m [z_u^m ; queue_u] / tau)
        + (1 - alpha) positives (docs/METHOD.md, L_align).
        """
        sim = student_rows @ columns / temp  # (B, Bg + Q)
        with torch.no_grad():
            sim_teacher = teacher_rows @ columns / temp
            targets = alpha * F.softmax(sim_teacher, dim=1) + (1 - alpha) * positives
        return soft_cross_entropy(sim, targets), sim

    def _clip_alignment(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor | None,
                        offset: int, diagnostics: dict[str, Any]) -> torch.Tensor:
        """Return the symmetric in-batch contrastive loss over the global batch (student features only)."""
        image_all = all_gather_with_grad(image_feat)  # (Bg, d)
        text_all = all_gather_with_grad(text_feat)
        ids_all = all_gather_no_grad(image_ids) if image_ids is not None else None
        targets = self._positive_targets(image_feat.shape[0], image_all.shape[0], offset, image_ids, ids_all,
                                         with_queue=False, device=image_feat.device)  # (B, Bg)
        sim_i2t = image_feat @ text_all.t() / self.temp
        sim_t2i = text_feat @ image_all.t() / self.temp
        loss_i2t, loss_t2i = soft_cross_entropy(sim_i2t, targets), soft_cross_entropy(sim_t2i, targets)
        diagnostics.update(align_i2t=loss_i2t.detach(), align_t2i=loss_t2i.detach(), sim_i2t=sim_i2t.detach(),
                           sim_t2i=sim_t2i.detach())
        loss = (loss_i2t + loss_t2i) / 2
        diagnostics["align_itc"] = loss.detach()
        return loss

    def _itm_loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, image_ids: torch.Tensor | None,
                  ids_all: torch.Tensor | None, offset: int,
                  sample_seeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (L_itm, accuracy): B positives and 2B hard negatives scored by the fusion encoder + itm_head."""
        batch = image_embeds.shape[0]
        image_embeds_all = all_gather_with_grad(image_embeds)  # (Bg, N, D): negatives come from the global batch
        text_embeds_all = all_gather_with_grad(text_embeds)  # (Bg, L, D)
        mask_all = all_gather_no_grad(attention_mask)  # (Bg, L)
        negative_image, negative_text = sample_hard_negatives(sim_i2t, sim_t2i, offset, image_ids, ids_all,
                                                              sample_seeds)
        text_all = torch.cat([text_embeds, text_embeds, text_embeds_all[negative_text]])  # (3B, L, D)
        mask_cat = torch.cat([attention_mask, attention_mask, mask_all[negative_text]])
        image_cat = torch.cat([image_embeds, image_embeds_all[negative_image], image_embeds])  # (3B, N, D)
        logits = self.itm_logits(image_cat, text_all, mask_cat)  # (3B, 2)
        labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]).to(
            logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss, accuracy

    def mlm_loss(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 image_embeds: torch.Tensor, image_embeds_m: torch.Tensor | None,
                 alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (L_mlm, CE, D, accuracy): ALBEF's MLM loss (1 - alpha) CE + alpha D over the masked tokens.

        CE: cross-entropy against labels (-100 ignored), averaged over all masked tokens of the (global) batch.
        D: mean over the same tokens of -sum_v softmax(teacher logits) log softmax(student logits); the
        teacher reads image_embeds_m. Only masked positions go through the MLM head (same numbers as
        ALBEF's full logits, ~7x less work on the vocabulary projection).
        """
        positions = labels != -100  # (B, L)
        hidden = self.text_encoder.bert.forward_multimodal(masked_ids, attention_mask, image_embeds)  # (B, L, D)
        # Average over the masked tokens of the *global* batch: each process divides its token sum by
        # (global count / world size), so DDP's gradient averaging gives the global mean and the step
        # does not depend on how the batch is split. In one process this is the plain mean (ALBEF).
        count = positions.sum().float()
        if is_distributed():
            count = all_reduce_sum_(count.clone()) / get_world_size()
        if not bool(positions.any()):  # nothing masked here: a zero that keeps the graph connected
            zero = hidden.sum() * 0.0
            return zero, zero.detach(), zero.detach(), zero.detach()
        logits = self.text_encoder.cls(hidden[positions]).float()  # (M, V)
        targets = labels[positions]
        ce = F.cross_entropy(logits, targets, reduction="sum") / count
        accuracy = (logits.detach().argmax(dim=1) == targets).float().mean()
        if alpha == 0 or image_embeds_m is None:
            return ce, ce.detach(), torch.zeros_like(ce).detach(), accuracy
        with torch.no_grad():
            hidden_m = self.text_encoder_m.bert.forward_multimodal(masked_ids, attention_mask, image_embeds_m)
            soft_labels = F.softmax(self.text_encoder_m.cls(hidden_m[positions]).float(), dim=-1)  # (M, V)
        distill = -(soft_labels * F.log_softmax(logits, dim=-1)).sum() / count
        return (1 - alpha) * ce + alpha * distill, ce.detach(), distill.detach(), accuracy

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, alpha: float,
                      image_ids: torch.Tensor | None, sample_seeds: torch.Tensor | None) -> None:
        """Raise ValueError naming the argument when a batch cannot be what the model was built for."""
        size = self.config.vision.image_size
        if image.dim() != 4 or image.shape[1:] != (3, size, size):
            raise ValueError(f"image must have shape (B, 3, {size}, {size}) for vision.image_size {size}, "
                             f"got {tuple(image.shape)}")
        batch = image.shape[0]
        if input_ids.dim() != 2 or input_ids.shape[0] != batch:
            raise ValueError(f"input_ids must have shape (B, L) with B = {batch}, got {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64, got {input_ids.dtype}")
        text = self.config.text
        if input_ids.shape[1] > text.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than text.max_position_embeddings "
                             f"{text.max_position_embeddings}")
        if int(input_ids.max()) >= text.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"input_ids has ids outside [0, text.vocab_size={text.vocab_size}); build the config "
                             f"with ModelConfig.with_tokenizer(tokenizer)")
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if image_ids is not None and (image_ids.shape != (batch,) or image_ids.dtype != torch.long):
            raise ValueError(f"image_ids must be an int64 tensor of shape ({batch},), got "
                             f"{tuple(image_ids.shape)} {image_ids.dtype}")
        if image_ids is not None and int(image_ids.min()) < 0:
            raise ValueError("image_ids must be >= 0 (-100 marks queue entries without an id)")
        if sample_seeds is not None and sample_seeds.shape != (batch,):
            raise ValueError(f"sample_seeds must have shape ({batch},), got {tuple(sample_seeds.shape)}")
