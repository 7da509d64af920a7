"""ViT image encoder: timm's class in ALBEF's configuration; bicubic position-embedding resampling."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from codis_lib.config import VisionConfig
from codis_lib.model.vit import build_vit, interpolate_pos_embed

SMALL = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4)


def test_vit_settings_and_output_shape():
    vit = build_vit(SMALL)
    assert vit.blocks[0].attn.qkv.bias is not None
    assert isinstance(vit.blocks[0].mlp.act, nn.GELU) and vit.blocks[0].mlp.act.approximate == "none"
    assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == 1e-6
    assert isinstance(vit.head, nn.Identity)
    tokens = vit.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 17, 32)  # CLS + 4x4 patches
    assert not any(k.startswith("head") for k in vit.state_dict())


def test_interpolate_pos_embed_is_bicubic_without_antialias():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 6 * 6, 8)
    for new_side in (4, 9):  # shrink and grow
        out = interpolate_pos_embed(pos, new_side * new_side)
        grid = pos[:, 1:].reshape(1, 6, 6, 8).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        expected = expected.permute(0, 2, 3, 1).reshape(1, -1, 8)
        assert out.shape == (1, 1 + new_side * new_side, 8)
        assert torch.equal(out[:, :1], pos[:, :1])  # CLS position untouched
        assert torch.allclose(out[:, 1:], expected, atol=1e-6)
    assert interpolate_pos_embed(pos, 36) is pos


def test_interpolated_vit_runs_at_the_new_size():
    vit32 = build_vit(SMALL)
    vit48 = build_vit(VisionConfig(**{**SMALL.__dict__, "image_size": 48}))
    state = vit32.state_dict()
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], vit48.patch_embed.num_patches)
    vit48.load_state_dict(state)
    assert vit48.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)
