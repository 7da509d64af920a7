"""Text/fusion encoder built from HF BERT blocks: bidirectional fusion, padding masks, tied MLM head."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from codis_lib.config import TextConfig
from codis_lib.model.bert import FusionLayer, TextFusionEncoder

TEXT = TextConfig(vocab_size=200, hidden_size=32, num_layers=3, fusion_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0, unk_token_id=1,
                  cls_token_id=2, sep_token_id=3, mask_token_id=4)
IMAGE_WIDTH = 24  # differs from the text width on purpose: cross-attention keys/values take the ViT width


def _encoder(implementation: str = "sdpa") -> TextFusionEncoder:
    torch.manual_seed(0)
    text = TextConfig(**{**TEXT.__dict__, "attn_implementation": implementation})
    return TextFusionEncoder(text, encoder_width=IMAGE_WIDTH).eval()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_fusion_self_attention_is_bidirectional(implementation):
    encoder = _encoder(implementation)
    torch.manual_seed(1)
    text_embeds = torch.randn(1, 6, 32)
    image_embeds = torch.randn(1, 5, IMAGE_WIDTH)
    mask = torch.ones(1, 6, dtype=torch.long)
    changed = text_embeds.clone()
    changed[0, 4] += 1.0  # perturb a *later* token
    with torch.no_grad():
        out = encoder.bert.forward_fusion(text_embeds, mask, image_embeds)
        out_changed = encoder.bert.forward_fusion(changed, mask, image_embeds)
    # A causal layer would leave token 0 bitwise unchanged; ours must not.
    assert (out[0, 0] - out_changed[0, 0]).abs().max() > 1e-3
    # Same check on a single fusion layer (the construction, not just the stack).
    layer = encoder.bert.encoder.layer[-1]
    assert isinstance(layer, FusionLayer)
    with torch.no_grad():
        single = layer(text_embeds, None, image_embeds)
        single_changed = layer(changed, None, image_embeds)
    assert (single[0, 0] - single_changed[0, 0]).abs().max() > 1e-3


def test_text_layers_are_bidirectional_and_image_reaches_fusion_only():
    encoder = _encoder()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    mask = torch.ones_like(ids)
    ids_changed = ids.clone()
    ids_changed[0, 5] = 99
    with torch.no_grad():
        a = encoder.bert.forward_text(ids, mask)
        b = encoder.bert.forward_text(ids_changed, mask)
        assert (a[0, 0] - b[0, 0]).abs().max() > 1e-3
        image1, image2 = torch.randn(2, 1, 5, IMAGE_WIDTH)
        fused1 = encoder.bert.forward_fusion(a, mask, image1)
        fused2 = encoder.bert.forward_fusion(a, mask, image2)
    assert (fused1 - fused2).abs().max() > 1e-3  # cross-attention sees the image


def test_padded_keys_are_masked_and_implementations_agree():
    encoder_sdpa, encoder_eager = _encoder("sdpa"), _encoder("eager")
    ids = torch.tensor([[2, 10, 11, 12, 0, 0], [2, 20, 21, 22, 23, 24]])
    mask = (ids != 0).long()
    other_pads = ids.clone()
    other_pads[0, 4:] = torch.tensor([50, 60])  # garbage where the mask is 0
    image = torch.randn(2, 5, IMAGE_WIDTH)
    with torch.no_grad():
        logits = encoder_sdpa.mlm_logits(ids, mask, image)
        logits_other = encoder_sdpa.mlm_logits(other_pads, mask, image)
        logits_eager = encoder_eager.mlm_logits(ids, mask, image)
    real = mask.bool()
    assert torch.allclose(logits[real], logits_other[real], atol=1e-5)
    assert torch.allclose(logits, logits_eager, atol=1e-5)


def test_mlm_decoder_is_tied_to_word_embeddings():
    encoder = _encoder()
    predictions = encoder.cls.predictions
    assert predictions.decoder.weight is encoder.bert.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias
    keys = set(encoder.state_dict())
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias"} <= keys
    assert "bert.encoder.layer.1.crossattention.self.key.weight" in keys  # ALBEF's names
    assert "bert.encoder.layer.0.crossattention.self.key.weight" not in keys  # layer 0 is text-only
    assert encoder.state_dict()["bert.encoder.layer.2.crossattention.self.key.weight"].shape == (32, IMAGE_WIDTH)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.tensor([[2, 10, 11, 12, 0], [2, 20, 21, 22, 23]])
    mask = (ids != 0).long()
    image = torch.randn(2, 5, IMAGE_WIDTH)
    grads = []
    for enabled in (False, True):
        encoder = _encoder().train()
        encoder.set_gradient_checkpointing(enabled)
        encoder.mlm_logits(ids, mask, image).square().mean().backward()
        grads.append(encoder.bert.encoder.layer[0].attention.self.query.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_first_token_only_and_shared_text_work_equal_the_full_fusion(implementation):
    """The ITM shortcuts (last layer at [CLS] only; the first layer's caption-only self-attention
    computed once) give the full fusion output's [CLS] row, with padding, a broadcast image and in
    backward, and really skip work (counted in FLOPs)."""
    encoder = _encoder(implementation)
    bert = encoder.bert
    torch.manual_seed(2)
    with torch.no_grad():  # BERT's zero biases would hide a mistake in how the shortcut treats them
        for module in bert.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(std=0.5)
    text_embeds = torch.randn(3, 7, 32, requires_grad=True)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    image = torch.randn(1, 5, IMAGE_WIDTH)  # one image broadcast over the three captions
    full = bert.forward_fusion(text_embeds, mask, image)  # (3, 7, 32)
    first = bert.forward_fusion(text_embeds, mask, image, first_token_only=True)
    assert first.shape == (3, 1, 32)
    torch.testing.assert_close(first, full[:, :1], atol=1e-6, rtol=0)
    states = bert.fusion_text_states(text_embeds, mask)
    for first_token_only in (False, True):
        shared = bert.forward_fusion(states, mask, image, first_token_only=first_token_only,
                                     text_self_attended=True)
        torch.testing.assert_close(shared[:, :1], full[:, :1], atol=1e-6, rtol=0)
    # gradients through the shortcut equal those through the full layer
    grad_full, = torch.autograd.grad(full[:, 0].square().sum(), text_embeds)
    grad_first, = torch.autograd.grad(first[:, 0].square().sum(), text_embeds)
    torch.testing.assert_close(grad_first, grad_full, atol=1e-6, rtol=1e-5)
    with torch.no_grad(), FlopCounterMode(display=False) as full_count:
        bert.forward_fusion(text_embeds, mask, image)
    with torch.no_grad(), FlopCounterMode(display=False) as first_count:
        bert.forward_fusion(text_embeds, mask, image, first_token_only=True)
    with torch.no_grad(), FlopCounterMode(display=False) as shared_count:
        bert.forward_fusion(states, mask, image, first_token_only=True, text_self_attended=True)
    # two fusion layers: the last one shrinks to its caption keys/values, the first loses its self-attention
    assert first_count.get_total_flops() < 0.7 * full_count.get_total_flops()
    assert shared_count.get_total_flops() < 0.8 * first_count.get_total_flops()
    # a single fusion layer: forward_first_token is the first row of forward
    layer = bert.encoder.layer[-1]
    with torch.no_grad():
        row = layer.forward_first_token(full.detach(), None, image)
        torch.testing.assert_close(row, layer(full.detach(), None, image)[:, :1], atol=1e-6, rtol=0)


def test_single_fusion_layer_with_both_shortcuts():
    """With one fusion layer, `text_self_attended` and `first_token_only` meet in the same layer."""
    torch.manual_seed(0)
    text = TextConfig(**{**TEXT.__dict__, "fusion_layers": 1})
    bert = TextFusionEncoder(text, encoder_width=IMAGE_WIDTH).eval().bert
    text_embeds, image = torch.randn(2, 6, 32), torch.randn(2, 4, IMAGE_WIDTH)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        full = bert.forward_fusion(text_embeds, mask, image)
        both = bert.forward_fusion(bert.fusion_text_states(text_embeds, mask), mask, image,
                                   first_token_only=True, text_self_attended=True)
    assert both.shape == (2, 1, 32)
    torch.testing.assert_close(both, full[:, :1], atol=1e-6, rtol=0)


def test_first_token_attention_under_dropout_matches_explicit_projections():
    """With attention dropout (training) the weights no longer sum to 1; the query-side form must still equal
    softmax(q K^T) with the same dropped weights applied to explicitly projected values."""
    from codis_lib.model.bert import _first_token_self_attention, attention_bias

    torch.manual_seed(3)
    attention = _encoder().bert.encoder.layer[-1].attention
    heads = attention.self
    keep = (torch.rand(2, TEXT.num_heads, 5) > 0.3).float() / 0.7  # a fixed dropout mask, rescaled

    class FixedDropout(torch.nn.Module):
        def forward(self, weights):
            return weights * keep

    heads.dropout = FixedDropout()
    with torch.no_grad():
        heads.value.bias.normal_()  # BERT initialises biases to 0, which would hide a wrong bias term
    hidden = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = _first_token_self_attention(attention, hidden, attention_bias(mask, hidden.dtype, "sdpa"))

    def split(x):  # (B, L, D) -> (B, H, L, d)
        return x.view(2, x.shape[1], TEXT.num_heads, -1).transpose(1, 2)

    q, k, v = split(heads.query(hidden[:, :1])), split(heads.key(hidden)), split(heads.value(hidden))
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * heads.scaling  # (B, H, L)
    logits = logits.masked_fill(mask[:, None, :] == 0, float("-inf"))
    weights = torch.softmax(logits, dim=-1) * keep
    context = (weights[:, :, None, :] @ v).squeeze(2).reshape(2, 1, -1)  # (B, 1, D)
    expected = attention.output(context, hidden[:, :1])
    assert (keep == 0).any() and not torch.allclose(weights.sum(-1), torch.ones(2, TEXT.num_heads))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
