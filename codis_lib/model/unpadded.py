"""BERT layers over the real tokens only ("unpadding"): the text and fusion layers of `bert.py`, packed.

A batch of captions is padded to its longest one; on the emoji corpus about half of the positions are
padding (8.3 real tokens in batches padded to about 17). Every per-token product of a BERT layer - the query,
key and value projections, the attention output projection, the feed-forward block, cross-attention's query
and output projections - runs here over the real tokens alone, gathered into one (N, D) matrix. Only the
attention itself sees the (B, L) layout, where the padded keys are masked exactly as in the padded layers.

So the real positions' outputs equal the padded layers' up to float rounding (tests/test_model_unpadded.py),
and padded positions come out as zeros: nothing reads them (they are masked as keys, and every head reads
[CLS] or a real masked token). `TextConfig.unpad` turns it on; the padded path stays the reference (ALBEF's
parity tests, `torch.compile` of whole layers, eager attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenPacking", "text_layer", "fusion_layer", "self_attention", "cross_attention"]


@dataclass(frozen=True)
class TokenPacking:
    """Where the real tokens of a (B, L) attention mask sit: their flat positions b * L + l, in order."""

    index: torch.Tensor  # (N,) int64
    batch: int
    length: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> "TokenPacking":
        """Return the packing of attention_mask (B, L), 1 on real tokens and 0 on padding."""
        batch, length = attention_mask.shape
        return cls(attention_mask.reshape(-1).nonzero().squeeze(1), batch, length)

    def pack(self, states: torch.Tensor) -> torch.Tensor:
        """Return the real tokens' rows (N, D) of states (B, L, D)."""
        return states.reshape(self.batch * self.length, states.shape[-1]).index_select(0, self.index)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """Return (B, L, D) holding rows (N, D) at the real positions and zeros at the padded ones."""
        width = rows.shape[-1]
        return rows.new_zeros(self.batch * self.length, width).index_copy(0, self.index, rows).view(
            self.batch, self.length, width)


def _attend(heads: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Return softmax(Q K^T * scaling + mask) V (B, Lq, H d) for projected query (B, Lq, H d), key/value (Bk, Lk, H d).

    heads: the BertSelfAttention (or cross-attention) module whose head count, scaling and dropout apply.
    Bk may be 1 (one image for every caption). mask: boolean (B, 1, 1, Lk), True = attend, or None.
    """
    batch, length, _ = query.shape
    num_heads, head_size = heads.num_attention_heads, heads.attention_head_size

    def split(x: torch.Tensor) -> torch.Tensor:  # (Bx, Lx, H d) -> (B, H, Lx, d)
        return x.view(x.shape[0], x.shape[1], num_heads, head_size).transpose(1, 2).expand(batch, -1, -1, -1)

    context = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask,
                                             dropout_p=heads.dropout.p if heads.training else 0.0,
                                             scale=heads.scaling)
    return context.transpose(1, 2).reshape(batch, length, num_heads * head_size)


def self_attention(attention: nn.Module, rows: torch.Tensor, packing: TokenPacking,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """Return a BertAttention block's output (N, D) for the real tokens' rows (N, D) of one caption batch."""
    heads = attention.self
    context = _attend(heads, packing.unpack(heads.query(rows)), packing.unpack(heads.key(rows)),
                      packing.unpack(heads.value(rows)), mask)
    return attention.output(packing.pack(context), rows)  # dense, dropout, LayerNorm(. + rows)


def cross_attention(attention: nn.Module, rows: torch.Tensor, packing: TokenPacking, image_embeds: torch.Tensor,
                    image_mask: torch.Tensor | None) -> torch.Tensor:
    """Return the cross-attention block's output (N, D): the real tokens' rows attending to image_embeds (Bi, Ni, Dv)."""
    heads = attention.self
    context = _attend(heads, packing.unpack(heads.query(rows)), heads.key(image_embeds), heads.value(image_embeds),
                      image_mask)
    return attention.output(packing.pack(context), rows)


def text_layer(layer: nn.Module, rows: torch.Tensor, packing: TokenPacking, mask: torch.Tensor | None) -> torch.Tensor:
    """Return a text-only BertLayer's output (N, D) on the real tokens' rows (N, D)."""
    attended = self_attention(layer.attention, rows, packing, mask)
    return layer.output(layer.intermediate(attended), attended)


def fusion_layer(layer: nn.Module, rows: torch.Tensor, packing: TokenPacking, mask: torch.Tensor | None,
                 image_embeds: torch.Tensor, image_mask: torch.Tensor | None, self_attend: bool = True) -> torch.Tensor:
    """Return a FusionLayer's output (N, D) on the real tokens' rows (N, D).

    self_attend=False: the rows are already the layer's self-attention output (`fusion_text_states`).
    """
    if self_attend:
        rows = self_attention(layer.attention, rows, packing, mask)
    attended = cross_attention(layer.crossattention, rows, packing, image_embeds, image_mask)
    return layer.output(layer.intermediate(attended), attended)
