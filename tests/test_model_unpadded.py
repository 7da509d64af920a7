"""Unpadded text and fusion layers (`model.text.unpad`): the padded layers' values at the real positions, less work."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from codis_lib.config import ConfigError, ModelConfig, TextConfig
from codis_lib.model import build_model
from codis_lib.model.bert import TextFusionEncoder
from codis_lib.model.unpadded import TokenPacking

TEXT = TextConfig(vocab_size=200, hidden_size=32, num_layers=4, fusion_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0, unk_token_id=1,
                  cls_token_id=2, sep_token_id=3, mask_token_id=4)
IMAGE_WIDTH = 24
LENGTHS = [10, 3, 5, 1, 7, 10]


def _pair() -> tuple[TextFusionEncoder, TextFusionEncoder]:
    """Return the padded and the unpadded encoder with the same weights."""
    torch.manual_seed(0)
    padded = TextFusionEncoder(TEXT, encoder_width=IMAGE_WIDTH)
    unpadded = TextFusionEncoder(TextConfig(**{**TEXT.__dict__, "unpad": True}), encoder_width=IMAGE_WIDTH)
    unpadded.load_state_dict(padded.state_dict())
    return padded.eval(), unpadded.eval()


def _captions(lengths=LENGTHS, width: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, TEXT.vocab_size, mask.shape) * mask
    ids[:, 0] = TEXT.cls_token_id
    return ids, mask


def test_packing_round_trip_keeps_real_rows_and_zeros_padding():
    ids, mask = _captions()
    packing = TokenPacking.of(mask)
    states = torch.randn(*mask.shape, 8)
    rows = packing.pack(states)
    assert rows.shape == (sum(LENGTHS), 8)
    back = packing.unpack(rows)
    real = mask.bool()
    assert torch.equal(back[real], states[real])
    assert torch.count_nonzero(back[~real]) == 0


def test_every_text_path_equals_the_padded_layers_at_real_positions():
    padded, unpadded = _pair()
    ids, mask = _captions()
    real = mask.bool()
    torch.manual_seed(2)
    images = torch.randn(len(LENGTHS), 5, IMAGE_WIDTH)
    with torch.no_grad():
        text_p, text_u = padded.bert.forward_text(ids, mask), unpadded.bert.forward_text(ids, mask)
        torch.testing.assert_close(text_u[real], text_p[real], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(text_u[~real]) == 0  # the padded rows were never computed
        for image_embeds in (images, images[:1]):  # one image per caption, and one image for every caption
            full_p = padded.bert.forward_fusion(text_p, mask, image_embeds)
            full_u = unpadded.bert.forward_fusion(text_p, mask, image_embeds)
            torch.testing.assert_close(full_u[real], full_p[real], rtol=1e-5, atol=1e-5)
            first_p = padded.bert.forward_fusion(text_p, mask, image_embeds, first_token_only=True)
            first_u = unpadded.bert.forward_fusion(text_p, mask, image_embeds, first_token_only=True)
            torch.testing.assert_close(first_u, first_p, rtol=1e-5, atol=1e-5)
        states_p = padded.bert.fusion_text_states(text_p, mask)
        states_u = unpadded.bert.fusion_text_states(text_p, mask)
        torch.testing.assert_close(states_u[real], states_p[real], rtol=1e-5, atol=1e-5)
        shared_p = padded.bert.forward_fusion(states_p, mask, images, first_token_only=True, text_self_attended=True)
        shared_u = unpadded.bert.forward_fusion(states_u, mask, images, first_token_only=True, text_self_attended=True)
        torch.testing.assert_close(shared_u, shared_p, rtol=1e-5, atol=1e-5)
        logits_p, logits_u = padded.mlm_logits(ids, mask, images), unpadded.mlm_logits(ids, mask, images)
        torch.testing.assert_close(logits_u[real], logits_p[real], rtol=1e-5, atol=1e-5)


def test_unpadded_layers_do_about_the_real_tokens_share_of_the_products():
    padded, unpadded = _pair()
    ids, mask = _captions()
    flops = []
    for encoder in (padded, unpadded):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            encoder.bert.forward_text(ids, mask)
        flops.append(counter.get_total_flops())
    share = mask.float().mean().item()  # 36 real of 60 positions
    assert flops[1] < flops[0] * (share + 0.1)


def test_a_batch_without_padding_takes_the_padded_path_unchanged():
    padded, unpadded = _pair()
    ids, mask = _captions(lengths=[10, 10, 10])
    with torch.no_grad():
        assert torch.equal(unpadded.bert.forward_text(ids, mask), padded.bert.forward_text(ids, mask))


def test_gradient_checkpointing_and_training_gradients_match():
    padded, unpadded = _pair()
    ids, mask = _captions()
    torch.manual_seed(2)
    images = torch.randn(len(LENGTHS), 5, IMAGE_WIDTH)
    grads = []
    for encoder, checkpointing in ((padded, False), (unpadded, True)):
        encoder.train().set_gradient_checkpointing(checkpointing)
        encoder.zero_grad()
        logits = encoder.mlm_logits(ids, mask, images)
        logits[mask.bool()].square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_whole_codis_step_gives_the_same_losses_and_gradients():
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny")
    padded = build_model(config).train()
    unpadded = build_model(config.with_overrides({"text.unpad": True})).train()
    unpadded.load_state_dict(padded.state_dict())
    batch, width = 8, 12
    mask = (torch.arange(width)[None] < torch.tensor([12, 3, 5, 7, 2, 12, 9, 4])[:, None]).long()
    torch.manual_seed(3)
    ids = torch.randint(5, config.text.vocab_size, (batch, width)) * mask
    ids[:, 0] = config.text.cls_token_id
    image = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size)
    outputs = []
    for model in (padded, unpadded):
        output = model(image, ids, mask, alpha=0.4, sample_seeds=torch.arange(batch))
        output.loss.backward()
        outputs.append(output)
    assert outputs[0].losses.keys() == outputs[1].losses.keys() and "mlm" in outputs[0].losses
    for name in outputs[0].losses:
        torch.testing.assert_close(outputs[1].losses[name], outputs[0].losses[name], rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(padded.named_parameters(), unpadded.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unpad_needs_sdpa_attention():
    with pytest.raises(ConfigError, match="text.unpad"):
        ModelConfig.preset("tiny").with_overrides({"text.unpad": True, "text.attn_implementation": "eager"})
