"""Word-level Grad-CAM on the fusion encoder's cross-attention: which image patches a caption's words match.

ALBEF's visualisation (its Grad-CAM notebook, the paper's per-word figure), for one (image, caption) pair:

1. run the fusion encoder with the cross-attention of ONE chosen fusion layer written out
   (`FusionLayer.attend_image_eager`): A (H heads, L caption tokens, 1 + N image tokens), each row a softmax;
2. differentiate the ITM **match logit** (column 1 of the ITM head, before the softmax, as ALBEF's
   `output[:, 1].sum().backward()`) with respect to A: G = d logit / d A;
3. map = mean over heads of relu(G) * A, i.e. relu(G * A) since A >= 0 (ALBEF clamps the gradient at 0
   and multiplies); the image's CLS column is dropped and the N patch columns are laid out on the
   ViT's patch grid (h, w): one map per caption token;
4. per word: the mean of its WordPiece pieces' maps ("smil ##ing" is one word); [CLS], [SEP] and [PAD]
   are no words. The caption's map is the mean of its word maps (ALBEF's notebook draws the [CLS] row
   instead; it is kept here as `token_maps[0]`).

Maps are left in their raw units (non-negative, comparable across the words of one pair, so the mean
weights a word by how much it contributed); `normalise_map` scales one to sum 1 over the grid for
comparisons ("share of the map in the left half") and `upsample_map` resizes it to the image to draw.

Which layer: ALBEF draws layer 8 of 12 BERT layers, the third of its six fusion layers, not the last.
In the LAST fusion layer the ITM head reads [CLS] alone and positions do not mix after that layer's
self-attention, so every word's row gets zero gradient there: only [CLS] has a map. The default,
`default_gradcam_layer`, is ALBEF's choice scaled to the number of fusion layers: F // 2 - 1, at least 0
(2 of 6; 0 of the tiny model's 2).

The normal forward (`FusionLayer.attend_image`, sdpa) is untouched; only this pass materialises A.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codis_lib.data.emoji_captions import CAPTION_STOPWORDS, name_span
from codis_lib.model.bert import attention_bias

__all__ = ["GradCAM", "gradcam", "gradcam_by_layer", "default_gradcam_layer", "caption_words", "content_words",
           "image_grid", "normalise_map",
           "upsample_map", "paste_scaled", "blank_canvas"]


@dataclass
class GradCAM:
    """Grad-CAM maps of one (image, caption) pair at one fusion layer; every map is (h, w) on the patch grid."""

    caption: str
    layer: int  # fusion layer (0 = the first fusion layer, BERT layer num_text_layers)
    itm_logit: float  # the match logit that was differentiated
    itm_probability: float  # softmax of the ITM logits, column 1
    tokens: list[str]  # the caption's pieces, [CLS] first
    token_maps: torch.Tensor  # (L, h, w): one map per token, [CLS] included
    words: list[str]  # the caption's words (its text spans, as the tokenizer split them)
    word_tokens: list[list[int]]  # token positions of each word
    word_maps: torch.Tensor  # (W, h, w): mean of each word's pieces' maps
    caption_map: torch.Tensor  # (h, w): mean of the word maps

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.caption_map.shape)


def image_grid(visual_encoder) -> tuple[int, int]:
    """Return the (rows, columns) of the image-token map: a ViT's patch grid, or a CNN trunk's feature map."""
    patch_embed = getattr(visual_encoder, "patch_embed", None)
    return tuple(patch_embed.grid_size if patch_embed is not None else visual_encoder.grid_size)


def default_gradcam_layer(fusion_layers: int) -> int:
    """Return ALBEF's choice of fusion layer scaled to `fusion_layers`: F // 2 - 1, at least 0 (2 of 6)."""
    if fusion_layers < 1:
        raise ValueError(f"fusion_layers must be >= 1, got {fusion_layers}")
    return max(0, fusion_layers // 2 - 1)


def caption_words(tokenizer, caption: str, max_length: int = 30) -> tuple[dict, list[str], list[list[int]]]:
    """Return (encoding, words, token positions of each word) of `caption`: [CLS] tokens, special tokens in no word.

    Words are the tokenizer's pre-tokenised words (WordPiece pieces of one word share a word id;
    punctuation is a word of its own, as the model sees it), spelt as their span of `caption`.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption must be a non-empty string, got {caption!r}")
    encoding = tokenizer(caption, truncation=True, max_length=max_length)
    try:
        word_ids = encoding.word_ids()
    except ValueError as error:  # a slow (Python) tokenizer has no word ids
        raise TypeError(f"Grad-CAM needs a fast tokenizer (word ids), got {type(tokenizer).__name__}") from error
    words: list[str] = []
    positions: list[list[int]] = []
    seen: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is None:  # [CLS], [SEP], [PAD]
            continue
        if word not in seen:
            seen[word] = len(words)
            span = encoding.word_to_chars(word)
            words.append(caption[span.start:span.end])
            positions.append([])
        positions[seen[word]].append(position)
    if not words:
        raise ValueError(f"caption {caption!r} has no word the tokenizer keeps")
    return encoding, words, positions


def content_words(caption: str, words: list[str]) -> list[int]:
    """Return the indices of `words` (`caption`'s words in order, as `GradCAM.words`) that name the thing drawn.

    Kept: the words inside the emoji's name (`name_span`: no "people & body emoji:" prefix, no ", a ...
    emoji" suffix), less punctuation and function words; every word with a letter or digit when that
    leaves none.
    """
    start, end = name_span(caption)
    kept, spoken, cursor = [], [], 0
    for index, word in enumerate(words):
        at = caption.find(word, cursor)
        if at < 0:
            raise ValueError(f"content_words: word {word!r} is not in caption {caption!r} after position {cursor}")
        cursor = at + len(word)
        if any(ch.isalnum() for ch in word):
            spoken.append(index)
            if start <= at < end and word.lower() not in CAPTION_STOPWORDS:
                kept.append(index)
    return kept or spoken


def _check_image(model, image: torch.Tensor) -> torch.Tensor:
    """Return `image` as (1, 3, S, S) on the model's device; anything else is a one-line ValueError."""
    size = model.config.vision.image_size
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or (image.dim() == 4 and image.shape[0] != 1):
        raise ValueError(f"image must be one (3, {size}, {size}) tensor, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    image = image if image.dim() == 4 else image[None]
    if tuple(image.shape[1:]) != (3, size, size):
        raise ValueError(f"image must be (3, {size}, {size}) (model.vision.image_size), got {tuple(image.shape[1:])}")
    return image.to(next(model.parameters()).device)


def _attention_and_gradients(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             layers: list[int]) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Return (ITM logits (1, 2), {fusion layer: (A, d match-logit / d A)}), each (1, H, L, 1 + N), in one pass.

    A is replaced by a leaf copy of itself (same values), so its gradient is d logit / d A and no
    parameter's .grad is touched; the other fusion layers run their normal forward.
    """
    bert = model.text_encoder.bert
    with torch.no_grad():
        image_embeds, _ = model.encode_image(image)
        text_embeds, _ = model.encode_text(input_ids, attention_mask)
    kept: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def replace(probabilities: torch.Tensor) -> torch.Tensor:
            kept[index] = probabilities.detach().requires_grad_(True)
            return kept[index]
        return replace

    with torch.enable_grad():
        mask = attention_bias(attention_mask, text_embeds.dtype, bert.attn_implementation)
        hidden = text_embeds
        for index, layer in enumerate(bert.encoder.layer[bert.num_text_layers:]):
            if index in layers:
                hidden, _ = layer.attend_image_eager(layer.attend_text(hidden, mask), image_embeds, None, keep(index))
            else:
                hidden = layer(hidden, mask, image_embeds, None)
        logits = model.itm_head(hidden[:, 0, :])  # (1, 2)
        grads = torch.autograd.grad(logits[:, 1].sum(), [kept[index] for index in layers])
    return logits.detach(), {index: (kept[index].detach(), grad) for index, grad in zip(layers, grads)}


def gradcam_by_layer(model, image: torch.Tensor, caption: str, tokenizer, *, layers: list[int] | None = None,
                     max_length: int = 30) -> list[GradCAM]:
    """Return the GradCAM of (image, caption) at each of `layers` (default: every fusion layer), from one pass.

    image: (3, S, S), normalised as the model's inputs (S = model.config.vision.image_size);
    caption: text, tokenised with ALBEF's convention ([CLS] tokens, at most `max_length`).
    """
    fusion_layers = model.config.text.fusion_layers
    layers = list(range(fusion_layers)) if layers is None else [int(index) for index in layers]
    bad = [index for index in layers if not 0 <= index < fusion_layers]
    if bad or not layers:
        raise ValueError(f"layers must be fusion layers 0..{fusion_layers - 1} (model.text.fusion_layers="
                         f"{fusion_layers}), got {layers}")
    image = _check_image(model, image)
    encoding, words, word_tokens = caption_words(tokenizer, caption, max_length)
    device = image.device
    input_ids = torch.tensor([encoding["input_ids"]], dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    vit = model.visual_encoder
    grid_h, grid_w = image_grid(vit)
    prefix = getattr(vit, "num_prefix_tokens", 1)
    was_training = model.training
    model.eval()
    try:
        logits, per_layer = _attention_and_gradients(model, image, input_ids, attention_mask, sorted(set(layers)))
    finally:
        model.train(was_training)
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    probability = float(torch.softmax(logits.float(), dim=-1)[0, 1])
    results = []
    for index in layers:
        attention, grad = per_layer[index]
        if attention.shape[-1] != prefix + grid_h * grid_w:
            raise ValueError(f"cross-attention has {attention.shape[-1]} image tokens, expected {prefix} + "
                             f"{grid_h}x{grid_w} patches")
        cam = (grad * attention).clamp(min=0).mean(dim=1)[0]  # (L, prefix + N): relu(G * A), mean over heads
        token_maps = cam[:, prefix:].reshape(-1, grid_h, grid_w).float().cpu()  # row-major patches, as the ViT
        word_maps = torch.stack([token_maps[positions].mean(dim=0) for positions in word_tokens])
        results.append(GradCAM(caption=caption, layer=index, itm_logit=float(logits[0, 1]),
                               itm_probability=probability, tokens=tokens, token_maps=token_maps, words=words,
                               word_tokens=word_tokens, word_maps=word_maps, caption_map=word_maps.mean(dim=0)))
    return results


def gradcam(model, image: torch.Tensor, caption: str, tokenizer, *, layer: int | None = None,
            max_length: int = 30) -> GradCAM:
    """Return the GradCAM of (image, caption) at fusion layer `layer` (default: `default_gradcam_layer`)."""
    if layer is None:
        layer = default_gradcam_layer(model.config.text.fusion_layers)
    return gradcam_by_layer(model, image, caption, tokenizer, layers=[layer], max_length=max_length)[0]


def normalise_map(cam: torch.Tensor) -> torch.Tensor:
    """Return `cam` / its sum, so that it sums to 1 over its last two dims; an all-zero map stays all zero."""
    total = cam.sum(dim=(-2, -1), keepdim=True)
    return torch.where(total > 0, cam / total.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


def upsample_map(cam: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Return the (h, w) map bilinearly resized to `size` (the image's pixels), for drawing over the image."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def blank_canvas(size: int, mean, std, value: float = 255.0) -> torch.Tensor:
    """Return a (3, size, size) image of one grey level `value` (0-255; white by default), normalised by mean/std."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((value / 255.0 - mean_t) / std_t).expand(3, size, size).clone()


def paste_scaled(canvas: torch.Tensor, image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """Return a copy of `canvas` (3, H, W) with `image` (3, h, w) resized to (size, size) pasted at (top, left).

    Both are in the same (normalised) space; resizing is area averaging, an affine operation, so it
    commutes with the normalisation. For synthetic composites: an object in a known place on a blank image.
    """
    _, height, width = canvas.shape
    if size < 1 or top < 0 or left < 0 or top + size > height or left + size > width:
        raise ValueError(f"a {size}x{size} paste at (top={top}, left={left}) does not fit a {height}x{width} canvas")
    out = canvas.clone()
    out[:, top:top + size, left:left + size] = F.interpolate(image[None].float(), size=(size, size), mode="area")[0]
    return out
