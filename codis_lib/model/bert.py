"""The text encoder, the fusion encoder and the MLM head, built from Hugging Face BERT blocks.

ALBEF splits one BERT of N layers in two (models/xbert.py there, `fusion_layer` = N - F):
- layers 0 .. N-F-1 are the *text encoder*: plain BERT layers over the caption;
- layers N-F .. N-1 are the *fusion encoder*: self-attention over the text, then cross-attention
  from the text (queries) to all image tokens (keys and values), then the feed-forward block.
The MLM head (dense, GELU, LayerNorm, decoder tied to the word embeddings + a vocabulary bias) sits
on the fusion output. Parameter names follow ALBEF's `text_encoder.bert.*` / `text_encoder.cls.*`.

Why the fusion layer is assembled here rather than taken as `BertLayer`: in transformers 5.x a
`BertLayer` only accepts cross-attention when `config.is_decoder=True`, and that flag builds its
self-attention as *causal* (token 0 would ignore token 4). ALBEF's fusion self-attention is
bidirectional. So a fusion layer is composed from the same building blocks BertLayer uses -
`BertAttention` (self, is_causal=False), `BertAttention` (cross), `BertIntermediate`, `BertOutput` -
and tests/test_model_bert.py checks that a later token changes an earlier token's output.

Attention runs through transformers' attention interface: "sdpa" (PyTorch
scaled_dot_product_attention, a boolean mask over padded keys) or "eager" (softmax(QK^T/sqrt(h)+M)V
with M = dtype-min on padded keys). Both equal ALBEF's additive -10000 mask in float32, because
exp(-10000) underflows to 0 just as exp(dtype-min) does.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (BertAttention, BertEmbeddings, BertIntermediate, BertLayer,
                                                    BertOnlyMLMHead, BertOutput)

from codis_lib.config import TextConfig
from codis_lib.model import unpadded

__all__ = ["make_bert_config", "FusionLayer", "BertTextFusion", "TextFusionEncoder", "attention_bias"]


def make_bert_config(text: TextConfig, encoder_width: int) -> BertConfig:
    """Return the transformers BertConfig for our text + fusion encoder (never a decoder)."""
    config = BertConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        intermediate_size=text.intermediate_size,
        hidden_act="gelu",  # exact erf GELU, as BERT and ALBEF
        hidden_dropout_prob=text.hidden_dropout,
        attention_probs_dropout_prob=text.attention_dropout,
        max_position_embeddings=text.max_position_embeddings,
        type_vocab_size=text.type_vocab_size,
        layer_norm_eps=text.layer_norm_eps,
        pad_token_id=text.pad_token_id,
        initializer_range=0.02,
        is_decoder=False,
        add_cross_attention=False,
    )
    config._attn_implementation = text.attn_implementation
    # ALBEF's names, kept for readers who compare with config_bert.json.
    config.fusion_layer = text.num_layers - text.fusion_layers
    config.encoder_width = encoder_width
    return config


def attention_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype, implementation: str) -> torch.Tensor | None:
    """Return the key mask (B, 1, 1, L) for transformers' attention interface, or None when nothing is masked.

    attention_mask: (B, L) with 1 on real tokens and 0 on padding. "sdpa" gets a boolean mask (True =
    attend); "eager" an additive one (0 or the dtype's most negative value).
    """
    if attention_mask is None:
        return None
    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, L)
    if implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class FusionLayer(nn.Module):
    """BERT layer: bidirectional self-attention, cross-attention to image tokens, feed-forward (post-LN)."""

    def __init__(self, config: BertConfig, encoder_width: int, layer_idx: int):
        super().__init__()
        self.attention = BertAttention(config, is_causal=False, layer_idx=layer_idx)
        self.crossattention = BertAttention(config, is_causal=False, layer_idx=layer_idx, is_cross_attention=True)
        # HF sizes the cross-attention key/value projections from hidden_size; the image tokens have
        # the ViT's width (ALBEF's `encoder_width`), which may differ.
        cross = self.crossattention.self
        cross.key = nn.Linear(encoder_width, cross.all_head_size)
        cross.value = nn.Linear(encoder_width, cross.all_head_size)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, image_embeds: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the layer output (B, L, D) for text states (B, L, D) attending to image_embeds (B, N, Dv)."""
        return self.attend_image(self.attend_text(hidden_states, attention_mask), image_embeds, image_mask)

    def attend_text(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Return the self-attention block's output (B, L, D): the part of the layer that never sees the image."""
        return self.attention(hidden_states, attention_mask)[0]

    def attend_image(self, text_states: torch.Tensor, image_embeds: torch.Tensor,
                     image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the layer output for self-attended text states (B, Lq, D): cross-attention, then feed-forward.

        Every position is computed independently here, so any subset of positions may be passed.
        """
        cross_out, _ = self.crossattention(text_states, None, image_embeds, image_mask)
        return self.output(self.intermediate(cross_out), cross_out)

    def attend_image_eager(self, text_states: torch.Tensor, image_embeds: torch.Tensor,
                           image_mask: torch.Tensor | None = None,
                           on_probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (`attend_image`'s output (B, Lq, D), the cross-attention probabilities (B, H, Lq, N)).

        The same layer with the attention written out: softmax(Q K^T / sqrt(d)) is materialised, which
        the sdpa kernel of the normal path never does, so it can be read (Grad-CAM) and differentiated.
        on_probabilities(p) may return a replacement used for the rest of the layer (e.g. `p.detach()
        .requires_grad_()`, a leaf whose gradient is d output / d p); it is what this returns as p.
        image_mask: from `attention_bias` (boolean or additive), or None.
        """
        cross = self.crossattention.self
        batch, length, _ = text_states.shape
        heads, head_size = cross.num_attention_heads, cross.attention_head_size
        query = cross.query(text_states).view(batch, length, heads, head_size).transpose(1, 2)  # (B, H, Lq, d)
        images, tokens, _ = image_embeds.shape  # images is B, or 1 (broadcast over the captions)
        key = cross.key(image_embeds).view(images, tokens, heads, head_size).transpose(1, 2)  # (Bi, H, N, d)
        value = cross.value(image_embeds).view(images, tokens, heads, head_size).transpose(1, 2)
        logits = torch.matmul(query, key.transpose(-1, -2)) * cross.scaling  # (B, H, Lq, N)
        if image_mask is not None:
            if image_mask.dtype == torch.bool:
                logits = logits.masked_fill(~image_mask, torch.finfo(logits.dtype).min)
            else:
                logits = logits + image_mask
        probabilities = cross.dropout(torch.softmax(logits, dim=-1))
        if on_probabilities is not None:
            probabilities = on_probabilities(probabilities)
        context = torch.matmul(probabilities, value).transpose(1, 2).reshape(batch, length, heads * head_size)
        cross_out = self.crossattention.output(context, text_states)
        return self.output(self.intermediate(cross_out), cross_out), probabilities

    def forward_first_token(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                            image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the layer output at position 0 only, (B, 1, D): equal to forward(...)[:, :1].

        The [CLS] state still attends to every caption token, but the self-attention is computed for
        one query (without projecting the other tokens, see `_first_token_self_attention`), and the
        cross-attention and feed-forward block run on one position instead of L. The ITM head reads
        nothing else, so the last fusion layer needs no more.
        """
        return self.attend_image(_first_token_self_attention(self.attention, hidden_states, attention_mask),
                                 image_embeds, image_mask)


def _first_token_self_attention(attention: BertAttention, hidden_states: torch.Tensor,
                                attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Return BertAttention's output at position 0 only, (B, 1, D): `attention(hidden_states, mask)[0][:, :1]`.

    With one query the key and value projections can be moved to the query side: per head h,
    q_h . (W_k,h x_j + b_k,h) = (W_k,h^T q_h) . x_j + const (the constant cancels in the softmax), and
    sum_j p_j (W_v,h x_j + b_v,h) = W_v,h (sum_j p_j x_j) + b_v,h sum_j p_j (= b_v,h without dropout). So no
    token is projected at all: two (D x D)-sized products per sequence instead of two per token.
    attention_mask: from `attention_bias` (boolean for sdpa, additive for eager) or None.
    """
    heads = attention.self
    batch, _, width = hidden_states.shape
    num_heads, head_size = heads.num_attention_heads, heads.attention_head_size
    first = hidden_states[:, :1]  # (B, 1, D)
    query = heads.query(first).view(batch, num_heads, head_size)  # (B, H, d)
    key_weight = heads.key.weight.view(num_heads, head_size, width)  # (H, d, D)
    value_weight = heads.value.weight.view(num_heads, head_size, width)
    query_in_input_space = torch.einsum("bhe,hed->bhd", query, key_weight)  # (B, H, D)
    logits = torch.bmm(query_in_input_space, hidden_states.transpose(1, 2)) * heads.scaling  # (B, H, L)
    if attention_mask is not None:  # (B, 1, 1, L)
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask[:, :, 0, :], torch.finfo(logits.dtype).min)
        else:
            logits = logits + attention_mask[:, :, 0, :]
    weights = heads.dropout(torch.softmax(logits, dim=-1))  # (B, H, L)
    pooled = torch.bmm(weights, hidden_states)  # (B, H, D): sum_j p_j x_j per head
    # sum_j p_j is 1, except under attention dropout in training, which rescales and zeroes some p_j
    bias = heads.value.bias.view(num_heads, head_size) * weights.sum(dim=-1, keepdim=True)  # (B, H, d)
    context = torch.einsum("bhd,hed->bhe", pooled, value_weight) + bias
    return attention.output(context.reshape(batch, 1, num_heads * head_size), first)


class _LayerStack(nn.Module):
    """Holder so parameter names read `encoder.layer.N.*`, as in BERT and ALBEF."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertTextFusion(nn.Module):
    """BERT embeddings + N layers; the first N-F are text-only, the last F fuse in the image (ALBEF's `bert`)."""

    def __init__(self, text: TextConfig, encoder_width: int):
        super().__init__()
        self.config = make_bert_config(text, encoder_width)
        self.num_text_layers = text.num_layers - text.fusion_layers
        self.attn_implementation = text.attn_implementation
        self.unpad = text.unpad  # per-token products over the real tokens only (codis_lib.model.unpadded)
        self.embeddings = BertEmbeddings(self.config)
        layers: list[nn.Module] = [BertLayer(self.config, layer_idx=i) for i in range(self.num_text_layers)]
        layers += [FusionLayer(self.config, encoder_width, layer_idx=i)
                   for i in range(self.num_text_layers, text.num_layers)]
        self.encoder = _LayerStack(layers)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise as BERT: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _run(self, layer: Callable, *args) -> torch.Tensor:
        """Return layer(*args), recomputed in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return the text encoder's last hidden state (B, L, D): embeddings, then the text-only layers."""
        hidden = self.embeddings(input_ids=input_ids)  # (B, L, D)
        mask = attention_bias(attention_mask, hidden.dtype, self.attn_implementation)
        packing = self._packing(attention_mask)  # unpadded: the real tokens' rows (N, D); zeros at padding after
        hidden = hidden if packing is None else packing.pack(hidden)
        for layer in self.encoder.layer[: self.num_text_layers]:
            hidden = (self._run(layer, hidden, mask) if packing is None
                      else self._run(unpadded.text_layer, layer, hidden, packing, mask))
        return hidden if packing is None else packing.unpack(hidden)

    def _packing(self, attention_mask: torch.Tensor | None) -> unpadded.TokenPacking | None:
        """Return the real tokens' packing when this encoder unpads and the batch holds padding, else None."""
        if not self.unpad or attention_mask is None or bool(attention_mask.all()):
            return None
        return unpadded.TokenPacking.of(attention_mask)

    def forward_fusion(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                       image_attention_mask: torch.Tensor | None = None, *, first_token_only: bool = False,
                       text_self_attended: bool = False) -> torch.Tensor:
        """Return the fusion encoder's last hidden state (B, L, D) for text states attending to image tokens.

        first_token_only: compute the last layer at position 0 ([CLS]) only and return (B, 1, D), the
          same values as the full output's [:, :1] for a fraction of the last layer's work.
        text_self_attended: `text_embeds` are already `fusion_text_states(...)`, the first fusion
          layer's self-attention output, which depends on the caption alone (so a caption paired with
          many images needs it once); that step is skipped.
        image_embeds may be (1, N, Dv) for any B: the cross-attention broadcasts one image over all captions.
        """
        mask = attention_bias(attention_mask, text_embeds.dtype, self.attn_implementation)
        image_mask = attention_bias(image_attention_mask, text_embeds.dtype, self.attn_implementation)
        layers = self.encoder.layer[self.num_text_layers:]
        packing = self._packing(attention_mask)  # unpadded: the real tokens' rows (N, D) until the end
        hidden = text_embeds if packing is None else packing.pack(text_embeds)
        for index, layer in enumerate(layers):
            attended = index == 0 and text_self_attended  # positions are independent after self-attention
            if index == len(layers) - 1 and first_token_only:  # [CLS] only, in the padded layout (one position)
                hidden = hidden if packing is None else packing.unpack(hidden)
                if attended:
                    return self._run(layer.attend_image, hidden[:, :1], image_embeds, image_mask)
                return self._run(layer.forward_first_token, hidden, mask, image_embeds, image_mask)
            if packing is not None:
                hidden = self._run(unpadded.fusion_layer, layer, hidden, packing, mask, image_embeds, image_mask,
                                   not attended)
            elif attended:
                hidden = self._run(layer.attend_image, hidden, image_embeds, image_mask)
            else:
                hidden = self._run(layer, hidden, mask, image_embeds, image_mask)
        return hidden if packing is None else packing.unpack(hidden)

    def fusion_text_states(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return the first fusion layer's self-attention output (B, L, D): the fusion work that needs no image.

        Pass it to forward_fusion(..., text_self_attended=True) with any images.
        """
        mask = attention_bias(attention_mask, text_embeds.dtype, self.attn_implementation)
        layer = self.encoder.layer[self.num_text_layers]
        packing = self._packing(attention_mask)
        if packing is not None:
            return packing.unpack(unpadded.self_attention(layer.attention, packing.pack(text_embeds), packing, mask))
        return layer.attend_text(text_embeds, mask)

    def forward_multimodal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                           image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the last hidden state (B, L, D) of all N layers (text then fusion), ALBEF's MLM path."""
        text_embeds = self.forward_text(input_ids, attention_mask)
        return self.forward_fusion(text_embeds, attention_mask, image_embeds, image_attention_mask)


class TextFusionEncoder(nn.Module):
    """BERT text + fusion encoder with the tied MLM head (ALBEF's `text_encoder`, a BertForMaskedLM)."""

    def __init__(self, text: TextConfig, encoder_width: int):
        super().__init__()
        self.bert = BertTextFusion(text, encoder_width)
        self.cls = BertOnlyMLMHead(self.bert.config)
        self.bert._init_weights(self.cls.predictions.transform.dense)
        self.bert._init_weights(self.cls.predictions.transform.LayerNorm)
        nn.init.zeros_(self.cls.predictions.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the decoder weight with the word embeddings and the decoder bias with predictions.bias (as BERT)."""
        predictions = self.cls.predictions
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn activation recomputation in backward on or off for every BERT layer."""
        self.bert.gradient_checkpointing = enabled

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                   image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return MLM logits (B, L, V) from all N layers with image cross-attention in the fusion layers."""
        hidden = self.bert.forward_multimodal(input_ids, attention_mask, image_embeds, image_attention_mask)
        return self.cls(hidden)
