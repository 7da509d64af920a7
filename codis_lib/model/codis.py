"""The CODIS model (docs/METHOD.md): ALBEF's encoders, momentum teacher and queues, plus the codebook.

One `forward` computes every active loss term of

    L = L_align + L_code + L_ot + L_itm + L_mlm              (each with its own weight)

and returns them separately (`CODISOutput`) with typed `Diagnostics` and, on request, the large
per-batch `Details`. The terms themselves are pure functions, one file per poster term in
`codis_lib.objectives`; `forward` encodes, calls them and refreshes the queues. Parameter and buffer names
follow ALBEF's checkpoints (`visual_encoder`, `text_encoder.bert`, `text_encoder.cls`, `vision_proj`,
`text_proj`, `itm_head`, the `*_m` teacher copies, `image_queue`, `text_queue`, `queue_ptr`, `temp`),
so `albef_checkpoint.load_albef_state_dict` is a checked, key-by-key mapping.

Step order in training mode (as ALBEF's `forward`):
1. clamp the temperature to [temp_min, temp_max]; EMA-update the teacher
   (teacher = m * teacher + (1 - m) * student); re-normalise the codebook rows;
2. student features z_v, z_t and teacher features z_v^m, z_t^m (of the teacher's own image / caption
   when given, see `ModelConfig.teacher_view`); teacher features are gathered from all processes, so
   every contrastive row sees the global batch plus the queue as columns;
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

import torch
import torch.nn as nn
import torch.nn.functional as F

from codis_lib.codebook import Codebook, codebook_losses, codebook_usage
from codis_lib.config import ModelConfig
from codis_lib.distributed import all_gather_no_grad, get_rank
from codis_lib.objectives.alignment import (AlignmentLosses, clip_alignment, distilled_alignment, float32_region,
                                            positive_targets)
from codis_lib.objectives.code_loss import code_probabilities
from codis_lib.objectives.itm import hard_negative_similarities, image_text_matching
from codis_lib.objectives.mlm import MLMLosses, masked_language_modelling
from codis_lib.model.bert import TextFusionEncoder
from codis_lib.model.inputs import check_inputs, check_teacher_inputs
from codis_lib.model.masking import mask_tokens
from codis_lib.model.output import CODISOutput, Details, Diagnostics
from codis_lib.model.efficientnet import EfficientNetTokens
from codis_lib.model.vit import build_vit

__all__ = ["CODIS", "CODISOutput", "Diagnostics", "Details"]


class _Terms:
    """The loss terms of one forward as they are computed: unweighted terms, weighted parts, diagnostics."""

    def __init__(self, weights: dict[str, float], diagnostics: Diagnostics, details: Details | None):
        self.weights = weights
        self.losses: dict[str, torch.Tensor] = {}
        self.weighted: list[torch.Tensor] = []  # in computation order; their sum is the total
        self.diagnostics = diagnostics
        self.details = details

    def add(self, name: str, loss: torch.Tensor) -> None:
        """Record term `name` and its weighted part."""
        self.losses[name] = loss
        self.weighted.append(self.weights[name] * loss)

    def add_alignment(self, align: AlignmentLosses) -> None:
        """Record L_align (weights apply to the cross-modal and unimodal means separately) and its diagnostics."""
        self.weighted.append(self.weights["align"] * align.itc)
        if align.unimodal is not None:
            self.weighted.append(self.weights["align_unimodal"] * align.unimodal)
            self.diagnostics.align_unimodal = align.unimodal.detach()
        self.losses["align"] = align.total
        self.diagnostics.align_itc = align.itc.detach()
        for name, loss in align.terms.items():
            setattr(self.diagnostics, f"align_{name}", loss.detach())
        if self.details is not None:
            for name, sim in align.sims.items():
                setattr(self.details, f"sim_{name}", sim.detach())

    def output(self) -> CODISOutput:
        """Return the CODISOutput whose total is the sum of the weighted terms."""
        total = torch.stack([w.float() for w in self.weighted]).sum()
        return CODISOutput(loss=total, losses=self.losses, diagnostics=self.diagnostics, details=self.details)


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
        self.visual_encoder = EfficientNetTokens(vision) if vision.backbone == "efficientnet_lite0" else build_vit(vision)
        self.text_encoder = TextFusionEncoder(text, encoder_width=vision.width)
        self.vision_proj = nn.Linear(vision.width, dim)
        self.text_proj = nn.Linear(text.hidden_size, dim)
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.temp = nn.Parameter(torch.ones([]) * config.temp)
        self.temp.requires_grad_(config.learn_temp)  # still a parameter, so the state-dict keys do not change

        # Momentum teacher: an EMA copy of every student part that produces features or MLM logits.
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)  # deepcopy keeps the decoder tied
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for _, teacher in self.teacher_pairs():
            teacher.requires_grad_(False)
        if hasattr(self.visual_encoder, "share_trunk_maps_with"):  # a frozen ImageNet trunk: one pass per image
            self.visual_encoder.share_trunk_maps_with(self.visual_encoder_m)

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
            # ITM then reads the last fusion layer at [CLS] only (`forward_first_token`): its self-attention key
            # bias shifts every logit of the one query alike and cancels in the softmax, so it has no gradient.
            self.text_encoder.bert.encoder.layer[-1].attention.self.key.bias.requires_grad_(False)

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
        """Return soft code probabilities (B, K) = softmax(z C^T / tau_c) for unit-norm features (B, d).

        The codes are re-normalised first: after an optimizer step their rows are off the unit sphere
        until the next training step's `normalize_`.
        """
        codes = F.normalize(self.codebook.weight.float(), dim=1)  # (K, d)
        return code_probabilities(feat.float(), codes, self.codebook.temperature)

    # ------------------------------------------------------------------ teacher and queues
    @torch.no_grad()
    def momentum_update(self) -> None:
        """Set every teacher parameter to m * teacher + (1 - m) * student (ALBEF's _momentum_update)."""
        momentum = self.config.momentum
        student_params, teacher_params = [], []
        for student, teacher in self.teacher_pairs():
            for param, param_m in zip(student.parameters(), teacher.parameters()):
                if param.requires_grad:  # a frozen part (the ImageNet trunk) is equal in both: nothing to average
                    student_params.append(param)
                    teacher_params.append(param_m)
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        """Set the teacher equal to the student (ALBEF's copy_params, after loading or initialising)."""
        for student, teacher in self.teacher_pairs():
            for param, param_m in zip(student.parameters(), teacher.parameters()):
                param_m.copy_(param)
            for buffer, buffer_m in zip(student.buffers(), teacher.buffers()):  # e.g. frozen batch-norm statistics
                buffer_m.copy_(buffer)

    @torch.no_grad()
    def copy_teacher_to_student(self) -> None:
        """Set the student equal to the EMA teacher, so that the student's code paths score the teacher's weights.

        For evaluating the teacher (e.g. `codis-eval --weights teacher`); clip mode has no teacher (ValueError).
        """
        if not self.config.uses_teacher:
            raise ValueError(f"copy_teacher_to_student: a {self.config.mode} model has no EMA teacher")
        for student, teacher in self.teacher_pairs():
            for param, param_m in zip(student.parameters(), teacher.parameters()):
                param.copy_(param_m)
            for buffer, buffer_m in zip(student.buffers(), teacher.buffers()):
                buffer.copy_(buffer_m)

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
                image_ids: torch.Tensor | None = None, sample_seeds: torch.Tensor | None = None,
                return_details: bool = False, image_teacher: torch.Tensor | None = None,
                teacher_input_ids: torch.Tensor | None = None,
                teacher_attention_mask: torch.Tensor | None = None) -> CODISOutput:
        """Return a CODISOutput with the weighted total, each active term and the diagnostics.

        image (B, 3, H, W); input_ids, attention_mask (B, L); alpha: distillation weight in [0, 1];
        image_ids (B,): retrieval fine-tuning (positives share an id, hard negatives never do);
        sample_seeds (B,): per-sample random streams (MLM masking, ITM negative draws);
        return_details: also keep the similarity matrices and Sinkhorn assignments in `output.details`;
        image_teacher (B, 3, H, W), teacher_input_ids / teacher_attention_mask (B, L'): the momentum
        teacher's own views (config.teacher_view "own", teacher_text_view "other_caption"), encoded by
        the teacher instead of the student's inputs (its image tokens also feed the MLM distillation);
        None: the student's inputs, as ALBEF. Ignored in clip mode (no teacher).
        """
        check_inputs(self.config, image, input_ids, attention_mask, alpha, image_ids, sample_seeds)
        check_teacher_inputs(self.config, image.shape[0], image_teacher, teacher_input_ids, teacher_attention_mask)
        self._begin_step()
        config, active = self.config, self.active
        image_embeds, image_feat = self.encode_image(image)  # (B, N, D), (B, d)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)  # (B, L, D), (B, d)
        terms = _Terms(self.weights, Diagnostics(temperature=self.temp.detach().clone()),
                       Details() if return_details else None)
        batch = image.shape[0]
        offset = get_rank() * batch  # this rank's rows are global columns offset .. offset + B - 1

        if config.mode == "clip":
            with float32_region(image.device):
                terms.add_alignment(clip_alignment(image_feat, text_feat, self.temp, offset=offset,
                                                   image_ids=image_ids))
            return terms.output()

        image_embeds_m, image_feat_m, text_feat_m = self._teacher_features(
            image if image_teacher is None else image_teacher,  # the teacher's own views, else the student's
            input_ids if teacher_input_ids is None else teacher_input_ids,
            attention_mask if teacher_input_ids is None else teacher_attention_mask)
        image_feat_m_all = all_gather_no_grad(image_feat_m)  # (Bg, d) global batch, rank order
        text_feat_m_all = all_gather_no_grad(text_feat_m)
        ids_all = all_gather_no_grad(image_ids) if image_ids is not None else None

        with float32_region(image.device):  # the features are float32 already; keep the sharp softmaxes there
            if active["align"]:
                positives = positive_targets(batch, image_feat_m_all.shape[0], offset, image_ids=image_ids,
                                             ids_all=ids_all, queue_ids=self.idx_queue[0],
                                             device=image_feat.device)  # (B, Bg + Q)
                image_columns = torch.cat([image_feat_m_all.t(), self.image_queue.clone().detach()], dim=1)  # (d, C)
                text_columns = torch.cat([text_feat_m_all.t(), self.text_queue.clone().detach()], dim=1)
                terms.add_alignment(distilled_alignment(image_feat, text_feat, image_feat_m, text_feat_m, image_columns,
                                                        text_columns, positives, alpha, self.temp,
                                                        unimodal=active["align_unimodal"],
                                                        student_columns=config.align_columns == "student"))
            if active["code"] or active["ot"]:
                self._codebook_terms(terms, image_feat, text_feat, image_feat_m, text_feat_m)

        if active["itm"]:
            sim_i2t, sim_t2i = hard_negative_similarities(image_feat, text_feat, image_feat_m_all, text_feat_m_all,
                                                          self.temp)  # (B, Bg) each
            itm = image_text_matching(self.itm_logits, image_embeds, text_embeds, attention_mask, sim_i2t, sim_t2i,
                                      offset=offset, image_ids=image_ids, ids_all=ids_all, sample_seeds=sample_seeds)
            terms.add("itm", itm.loss)
            terms.diagnostics.itm_accuracy = itm.accuracy

        if active["mlm"]:
            masked_ids, labels = mask_tokens(
                input_ids, vocab_size=config.text.vocab_size, mask_token_id=config.text.mask_token_id,
                pad_token_id=config.text.pad_token_id, cls_token_id=config.text.cls_token_id,
                mlm_probability=config.mlm_probability, sample_seeds=sample_seeds,
                draw_length=config.text.max_position_embeddings)
            mlm = self.mlm_loss(masked_ids, attention_mask, labels, image_embeds, image_embeds_m, alpha)
            terms.add("mlm", mlm.loss)
            diagnostics = terms.diagnostics
            diagnostics.mlm_accuracy, diagnostics.mlm_ce, diagnostics.mlm_distill = mlm.accuracy, mlm.ce, mlm.distill

        if self.training:
            self.dequeue_and_enqueue(image_feat_m_all, text_feat_m_all, ids_all)
        return terms.output()

    @torch.no_grad()
    def _teacher_features(self, image: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the teacher's (image_embeds_m (B, N, D), image_feat_m (B, d), text_feat_m (B, d)) of its inputs."""
        image_embeds_m, image_feat_m = self.encode_image_teacher(image)
        _, text_feat_m = self.encode_text_teacher(input_ids, attention_mask)
        return image_embeds_m, image_feat_m, text_feat_m

    def _begin_step(self) -> None:
        """Clamp the temperature; in training mode also EMA-update the teacher and re-normalise the codebook.

        In eval mode the model is left unchanged apart from the clamp, so a validation pass is side-effect free.
        """
        config, active = self.config, self.active
        with torch.no_grad():
            self.temp.clamp_(config.temp_min, config.temp_max)
        if self.training and config.uses_teacher:
            self.momentum_update()
        if self.training and (active["code"] or active["ot"]):
            self.codebook.normalize_()

    def _codebook_terms(self, terms: _Terms, image_feat: torch.Tensor, text_feat: torch.Tensor,
                        image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        """Add the active codebook terms (L_code, L_ot; Sinkhorn over the global batch) and their diagnostics."""
        config = self.config
        parts = codebook_losses(self.codebook, image_feat, text_feat, image_feat_m, text_feat_m,
                                eps=config.sinkhorn_eps, n_iters=config.sinkhorn_iters,
                                log_domain=config.sinkhorn_log_domain, distributed=True)
        if self.active["code"]:
            terms.add("code", parts.code)
        if self.active["ot"]:
            terms.add("ot", parts.ot)
        diagnostics = terms.diagnostics
        diagnostics.code_t2p, diagnostics.code_i2p = parts.code_t2p.detach(), parts.code_i2p.detach()
        diagnostics.ot_image, diagnostics.ot_text = parts.ot_image.detach(), parts.ot_text.detach()
        if terms.details is not None:
            terms.details.assign_image, terms.details.assign_text = parts.image_plan.detach(), parts.text_plan.detach()
        with torch.no_grad():
            predictions = torch.cat([self.assign_codes(image_feat), self.assign_codes(text_feat)])  # (2B, K)
            usage = codebook_usage(predictions)
        diagnostics.codebook_perplexity, diagnostics.dead_codes = usage["perplexity"], usage["dead_codes"]
        diagnostics.hard_code_perplexity = usage["hard_perplexity"]

    def mlm_loss(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 image_embeds: torch.Tensor, image_embeds_m: torch.Tensor | None, alpha: float) -> MLMLosses:
        """Return (L_mlm, CE, D, accuracy) of masked captions: the student and teacher encoders around
        `objectives.mlm.masked_language_modelling`.

        labels (B, L): original ids at the masked positions, -100 elsewhere. The teacher reads
        image_embeds_m (None: no distillation).
        """
        hidden = self.text_encoder.bert.forward_multimodal(masked_ids, attention_mask, image_embeds)  # (B, L, D)

        def teacher_logits(positions: torch.Tensor) -> torch.Tensor:  # (M, V) at the masked positions
            hidden_m = self.text_encoder_m.bert.forward_multimodal(masked_ids, attention_mask, image_embeds_m)
            return self.text_encoder_m.cls(hidden_m[positions])

        return masked_language_modelling(hidden, labels, self.text_encoder.cls, alpha=alpha,
                                         teacher_logits=None if image_embeds_m is None else teacher_logits)
