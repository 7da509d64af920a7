"""The image encoder: timm's VisionTransformer in ALBEF's configuration.

ALBEF's ViT (models/vit.py there) is the timm/DeiT design: a stride-p patch convolution, a CLS
token, learned absolute position embeddings, pre-norm blocks x + Attn(LN(x)), x + MLP(LN(x)) with
qkv bias, exact GELU and LayerNorm eps 1e-6, then a final LayerNorm, and no classification head. We
build timm's own class with those settings, so parameter names match ALBEF's `visual_encoder.*`
keys one to one.

Changing the image size (256 px pretraining -> 384 px fine-tuning, or DeiT's 224 px weights) needs
the position embeddings resampled; `interpolate_pos_embed` does what ALBEF's function of the same
name does: bicubic, align_corners=False, no antialiasing, CLS position kept as is.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from codis_lib.config import VisionConfig

__all__ = ["build_vit", "interpolate_pos_embed", "DEIT_HUB_NAME"]

DEIT_HUB_NAME = "deit_base_patch16_224"


def build_vit(config: VisionConfig) -> VisionTransformer:
    """Return a randomly initialised timm VisionTransformer that outputs all tokens (B, 1 + N, width)."""
    vit = VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=3,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=config.norm_eps),
        act_layer=nn.GELU,  # exact (erf) GELU, as ALBEF and DeiT
        drop_path_rate=config.drop_path_rate,
        num_classes=0,  # no head: ALBEF uses every token
        global_pool="",
        class_token=True,
    )
    return vit


def encode_image_tokens(vit: VisionTransformer, image: torch.Tensor) -> torch.Tensor:
    """Return all token features (B, 1 + N, width) after the final LayerNorm (CLS first)."""
    return vit.forward_features(image)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Return pos_embed (1, prefix + n_old, D) resampled bicubically to (1, prefix + num_patches, D).

    Matches ALBEF's interpolate_pos_embed: square grids, bicubic, align_corners=False, and no
    antialiasing (timm's default antialias=True would differ when shrinking the grid).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    old_patches = pos_embed.shape[1] - num_prefix_tokens
    old_side, new_side = math.isqrt(old_patches), math.isqrt(num_patches)
    if old_side * old_side != old_patches or new_side * new_side != num_patches:
        raise ValueError(f"position embeddings must cover square grids: {old_patches} -> {num_patches} patches")
    if old_patches == num_patches:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=[new_side, new_side], old_size=[old_side, old_side],
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False,
                                  align_corners=False)
