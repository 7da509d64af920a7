"""Word-level Grad-CAM on the fusion encoder: the eager pass is the model, the maps add up, and they follow the object.

The "follows the object" test needs a model whose ITM score depends on a KNOWN part of the image, which
CI cannot get by training in seconds (a 40-step model does not localise; the main command's model does
only roughly, see notebook 05). So it builds one: a real tiny CODIS whose ViT blocks are set to the
identity and whose patch embedding maps a blank (white) patch to an all-zero token, with no value bias
in the cross-attention. Blank patches then contribute nothing to the cross-attention's output, so
d logit / d A is exactly 0 on them and a correct Grad-CAM must put all its mass on the patches the
pasted emoji covers, whatever the (random) text and fusion weights. A map read from the wrong columns
(the image's CLS kept, the grid transposed, another token's row) puts half or more of it elsewhere.
"""
from __future__ import annotations

import pytest
import torch

from codis_lib import CLIP_MEAN, CLIP_STD, RetrievalEvalDataset
from codis_lib.config import ModelConfig
from codis_lib.data.tokenizer import load_tokenizer
from codis_lib.evaluation.gradcam import (blank_canvas, caption_words, content_words, default_gradcam_layer, gradcam,
                                          gradcam_by_layer, image_grid, normalise_map, paste_scaled, upsample_map)
from codis_lib.model import build_model
from codis_lib.model.bert import attention_bias
from tests.fixtures_data.corpus import SMALL_CORPUS_SIZE, small_emoji_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny fusion calls lose from a 2nd thread

CANVAS = 64  # the tiny preset's image size: 16-px patches on a 4x4 grid


@pytest.fixture(scope="module")
def corpus(one_thread):
    root, _ = small_emoji_corpus()
    tokenizer = load_tokenizer(root / "tokenizer")
    dataset = RetrievalEvalDataset(root / "test.json", image_size=SMALL_CORPUS_SIZE)  # 32-px emoji
    return tokenizer, dataset


def _model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig.preset("tiny").with_tokenizer(tokenizer)).eval()


@pytest.fixture(scope="module")
def random_model(corpus):
    return _model(corpus[0])


def _caption(dataset, index: int) -> str:
    return dataset.texts[dataset.img2txt[index][0]]


def test_the_eager_cross_attention_is_the_normal_layer(random_model):
    gen = torch.Generator().manual_seed(0)
    layer = random_model.text_encoder.bert.encoder.layer[random_model.text_encoder.bert.num_text_layers]
    text = torch.randn(3, 7, 128, generator=gen)
    image = torch.randn(3, 17, 128, generator=gen)
    image_mask = torch.ones(3, 17, dtype=torch.long)
    image_mask[1, 12:] = 0  # one image with padded tokens: both mask kinds must agree
    for mask in (None, attention_bias(image_mask, text.dtype, "sdpa"), attention_bias(image_mask, text.dtype, "eager")):
        expected = layer.attend_image(text, image, mask)
        got, probabilities = layer.attend_image_eager(text, image, mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert probabilities.shape == (3, 4, 7, 17)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(3, 4, 7))
    assert float(probabilities.detach()[1, :, :, 12:].abs().max()) == 0.0  # padded image tokens get no attention


@pytest.mark.parametrize("caption,expected", [
    ("people & body emoji: man getting haircut", ["man", "getting", "haircut"]),  # the group prefix goes
    ("man getting haircut, a person activity emoji", ["man", "getting", "haircut"]),  # the subgroup suffix goes
    ("flag: japan", ["flag", "japan"]),  # a name with a colon of its own keeps it all
    ("flags emoji: flag: japan", ["flag", "japan"]),
    ("face with tears of joy", ["face", "tears", "joy"]),  # function words go
    ("of the", ["of", "the"]),  # nothing but function words: every word stays
    # the same templates after ALBEF's pre_caption, as the datasets hold them (no ":" and no ",")
    ("people & body emoji man getting haircut", ["man", "getting", "haircut"]),
    ("man with a probing cane a person activity emoji", ["man", "probing", "cane"]),  # the last article starts it
    ("objects emoji paintbrush", ["paintbrush"]),
    ("a button blood type", ["button", "blood", "type"]),
])
def test_content_words_keep_the_words_that_name_the_emoji(corpus, caption, expected):
    _, words, _ = caption_words(corpus[0], caption)
    assert [words[i] for i in content_words(caption, words)] == expected
    with pytest.raises(ValueError, match="not in caption"):
        content_words(caption, words + ["zqxjv"])


def test_shapes_sums_and_the_caption_map_is_the_mean_of_the_word_maps(random_model, corpus):
    tokenizer, dataset = corpus
    blank = blank_canvas(CANVAS, CLIP_MEAN, CLIP_STD)
    image = paste_scaled(blank, dataset[0]["image"], 16, 0, 32)
    caption = _caption(dataset, 0) + " zqxjv"  # a made-up word the tokenizer must split into pieces
    cams = gradcam_by_layer(random_model, image, caption, tokenizer)
    encoding, words, positions = caption_words(tokenizer, caption)
    assert [cam.layer for cam in cams] == [0, 1] and default_gradcam_layer(2) == 0 and default_gradcam_layer(6) == 2
    assert words[-1] == "zqxjv" and len(positions[-1]) > 1  # pieces of one word are merged
    logit = random_model.itm_logits(*[random_model.encode_image(image[None])[0],
                                      *[random_model.encode_text(torch.tensor([encoding["input_ids"]]),
                                                                 torch.ones(1, len(encoding["input_ids"]),
                                                                            dtype=torch.long))[0]],
                                      torch.ones(1, len(encoding["input_ids"]), dtype=torch.long)])[0, 1]
    for cam in cams:
        assert cam.token_maps.shape == (len(encoding["input_ids"]), 4, 4) and cam.tokens[0] == "[CLS]"
        assert cam.word_maps.shape == (len(words), 4, 4) and cam.caption_map.shape == (4, 4) and cam.grid == (4, 4)
        assert cam.words == words and cam.word_tokens == positions
        assert float(cam.token_maps.min()) >= 0.0
        assert abs(cam.itm_logit - float(logit.detach())) < 1e-5  # the eager pass scores what the model scores
        for word, pieces in enumerate(positions):
            torch.testing.assert_close(cam.word_maps[word], cam.token_maps[pieces].mean(0))
        torch.testing.assert_close(cam.caption_map, cam.word_maps.mean(0))
        assert all(0 not in pieces for pieces in positions)  # [CLS] is in no word
    first, last = cams
    assert float(first.caption_map.sum()) > 0
    torch.testing.assert_close(normalise_map(first.caption_map).sum(), torch.tensor(1.0))
    torch.testing.assert_close(normalise_map(first.word_maps).sum(dim=(-2, -1)),
                               (first.word_maps.sum(dim=(-2, -1)) > 0).float())  # 1, or 0 for an all-zero map
    # last fusion layer: the ITM head reads [CLS] only, so no word row has a gradient there
    assert float(last.word_maps.abs().max()) == 0.0 and float(last.token_maps[0].sum()) > 0
    assert upsample_map(first.caption_map, CANVAS).shape == (CANVAS, CANVAS)
    assert float(first.caption_map.sum()) > 0 and gradcam(random_model, image, caption, tokenizer).layer == 0
    # nothing leaks into the parameters' gradients
    assert all(p.grad is None for p in random_model.parameters())


@torch.no_grad()
def _blank_blind(model, blank: torch.Tensor):
    """Make blank patches all-zero image tokens and drop the cross-attention value bias (see the module docstring)."""
    vit = model.visual_encoder
    vit.pos_embed.zero_()
    vit.cls_token.zero_()
    for block in vit.blocks:  # pre-norm residual blocks whose branches add 0: the identity
        for linear in (block.attn.proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    vit.norm.bias.zero_()
    proj = vit.patch_embed.proj
    proj.bias -= proj(blank[None])[0, :, 0, 0]  # a blank patch -> 0 (before the final LayerNorm: ~0 after)
    bert = model.text_encoder.bert
    for layer in bert.encoder.layer[bert.num_text_layers:]:
        layer.crossattention.self.value.bias.zero_()
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_the_map_follows_the_object_to_either_half(corpus, seed):
    tokenizer, dataset = corpus
    blank = blank_canvas(CANVAS, CLIP_MEAN, CLIP_STD)
    model = _blank_blind(_model(tokenizer, seed=seed), blank)
    image_tokens = model.encode_image(blank[None])[0][0, 1:]
    assert float(image_tokens.abs().max()) < 1e-2  # the construction holds: a blank image has ~zero tokens
    for index in range(3):
        emoji, caption = dataset[index]["image"], _caption(dataset, index)
        shares = {}
        for side, left in (("left", 0), ("right", 32)):
            cam = normalise_map(gradcam(model, paste_scaled(blank, emoji, 16, left, 32), caption, tokenizer).caption_map)
            assert abs(float(cam.sum()) - 1.0) < 1e-5  # some word has a positive contribution
            shares[side] = float(cam[:, :2].sum())  # share of the map in the left half (grid columns 0, 1)
            # the emoji covers grid rows 1-2 (pixels 16-47): nothing above or below it either
            assert float(cam[[0, 3]].sum()) < 0.01, (caption, side)
        assert shares["left"] > 0.99 and shares["right"] < 0.01, (caption, shares)


def test_bad_inputs_are_one_line_errors(random_model, corpus):
    tokenizer, _ = corpus
    image = torch.zeros(3, CANVAS, CANVAS)
    with pytest.raises(ValueError, match="model.vision.image_size"):
        gradcam(random_model, torch.zeros(3, 32, 32), "a face", tokenizer)
    with pytest.raises(ValueError, match="fusion layers 0..1"):
        gradcam(random_model, image, "a face", tokenizer, layer=2)
    with pytest.raises(ValueError, match="non-empty"):
        gradcam(random_model, image, "  ", tokenizer)
    with pytest.raises(ValueError, match="does not fit"):
        paste_scaled(image, image, 40, 0, 32)


def test_the_drawing_has_a_panel_per_map(random_model, corpus):
    from codis_lib.viz import plot_gradcam_rows, to_display_image

    tokenizer, dataset = corpus
    image = paste_scaled(blank_canvas(CANVAS, CLIP_MEAN, CLIP_STD), dataset[0]["image"], 16, 32, 32)
    cam = gradcam(random_model, image, _caption(dataset, 0), tokenizer)
    panels = [("caption", cam.caption_map.numpy())] + [(w, m.numpy()) for w, m in zip(cam.words, cam.word_maps)]
    fig = plot_gradcam_rows([to_display_image(image, CLIP_MEAN, CLIP_STD)] * 2, ["a", "b"], [panels, panels[:1]])
    assert len(fig.axes) == 2 * (1 + len(panels))
    assert fig.axes[1].get_title().startswith("caption") and len(fig.axes[1].images) == 2  # image + map
    with pytest.raises(ValueError, match="one entry per row"):
        plot_gradcam_rows([image], ["a", "b"], [panels])


def test_gradcam_reads_the_token_grid_of_the_imagenet_tower(corpus):
    tokenizer, dataset = corpus
    config = ModelConfig.preset("tiny").with_tokenizer(tokenizer).with_overrides(
        {"vision.backbone": "efficientnet_lite0", "vision.image_size": CANVAS, "vision.backbone_size": 2 * CANVAS,
         "vision.trunk_stages": 7})
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert image_grid(model.visual_encoder) == (CANVAS // 16, CANVAS // 16)  # twice the pixels at stride 32
    image = paste_scaled(blank_canvas(CANVAS, CLIP_MEAN, CLIP_STD), dataset[0]["image"], 16, 0, 32)
    cam = gradcam(model, image, _caption(dataset, 0), tokenizer)
    assert cam.caption_map.shape == (CANVAS // 16, CANVAS // 16) and float(cam.caption_map.sum()) > 0
    vit = _model(tokenizer).visual_encoder
    assert image_grid(vit) == tuple(vit.patch_embed.grid_size)
