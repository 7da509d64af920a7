"""The unimodal features of an evaluation set: every image and every caption through its encoder, once.

Step 1 of ALBEF's retrieval protocol (codis_lib/evaluation/retrieval.py): the encoder outputs
(`image_embeds`, `text_embeds`, kept for the fusion encoder's re-ranking) and the projected unit
features whose dot products rank the candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class RetrievalFeatures:
    """Unimodal outputs of every image and caption of an evaluation set, computed once."""

    image_embeds: torch.Tensor  # (num_images, N, D) image encoder tokens, input of the fusion encoder
    image_feat: torch.Tensor  # (num_images, d) unit-norm projected CLS
    text_embeds: torch.Tensor  # (num_texts, L, D) text encoder tokens
    text_feat: torch.Tensor  # (num_texts, d) unit-norm projected CLS
    text_attention_mask: torch.Tensor  # (num_texts, L) 1 on real tokens, right padding

    @property
    def num_images(self) -> int:
        return self.image_feat.shape[0]

    @property
    def num_texts(self) -> int:
        return self.text_feat.shape[0]

    def similarity_i2t(self) -> torch.Tensor:
        """Return the contrastive similarity image_feat @ text_feat.T, shape (num_images, num_texts)."""
        return self.image_feat @ self.text_feat.t()


@torch.no_grad()
def encode_images(model, image_batches: Iterable[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (image_embeds (N, T, D), unit image_feat (N, d)) of image batches, in order (the model's mode as it is)."""
    image_embeds, image_feat = [], []
    for images in image_batches:
        embeds, feat = model.encode_image(images.to(device))  # (B, T, D), (B, d)
        image_embeds.append(embeds)
        image_feat.append(feat)
    if not image_feat:
        raise ValueError("image_batches is empty: nothing to evaluate")
    return torch.cat(image_embeds), torch.cat(image_feat)


@torch.no_grad()
def compute_features(model, image_batches: Iterable[torch.Tensor], text_input_ids: torch.Tensor,
                     text_attention_mask: torch.Tensor, *, text_batch_size: int = 256,
                     device: torch.device | str | None = None) -> RetrievalFeatures:
    """Return the RetrievalFeatures of all images (given as batches, in dataset order) and all tokenised captions.

    text_input_ids, text_attention_mask: (num_texts, L), right-padded to a common L.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if text_input_ids.shape != text_attention_mask.shape or text_input_ids.dim() != 2:
        raise ValueError(f"text_input_ids {tuple(text_input_ids.shape)} and text_attention_mask "
                         f"{tuple(text_attention_mask.shape)} must be the same (num_texts, L) shape")
    if text_batch_size < 1:
        raise ValueError(f"text_batch_size must be >= 1, got {text_batch_size}")
    was_training = model.training
    model.eval()
    try:
        image_embeds, image_feat = encode_images(model, image_batches, device)
        text_embeds, text_feat = [], []
        for start in range(0, text_input_ids.shape[0], text_batch_size):
            ids = text_input_ids[start:start + text_batch_size].to(device)
            mask = text_attention_mask[start:start + text_batch_size].to(device)
            embeds, feat = model.encode_text(ids, mask)  # (B, L, D), (B, d)
            text_embeds.append(embeds)
            text_feat.append(feat)
    finally:
        model.train(was_training)
    return RetrievalFeatures(
        image_embeds=image_embeds, image_feat=image_feat,
        text_embeds=torch.cat(text_embeds), text_feat=torch.cat(text_feat),
        text_attention_mask=text_attention_mask.to(device))


@torch.no_grad()
def dataset_features(model, dataset, tokenizer, *, image_batch_size: int = 64, text_batch_size: int = 256,
                     max_length: int = 30, device: torch.device | str | None = None,
                     num_workers: int = 0) -> RetrievalFeatures:
    """Return the RetrievalFeatures of a RetrievalEvalDataset (images in dataset order, all of `dataset.texts`).

    Captions are tokenised once with ALBEF's convention ([CLS] tokens, truncated to `max_length`),
    padded to the longest caption of the whole set so that every text shares one length L.
    """
    from torch.utils.data import DataLoader

    from codis_lib.data.collate import collate_eval_images, tokenize_captions

    for attribute in ("texts", "txt2img", "img2txt"):
        if not hasattr(dataset, attribute):
            raise TypeError(f"dataset {type(dataset).__name__} has no `{attribute}`: expected a "
                            "codis_lib.data.datasets.RetrievalEvalDataset (ALBEF's re_eval_dataset)")
    if image_batch_size < 1:
        raise ValueError(f"image_batch_size must be >= 1, got {image_batch_size}")
    tokens = tokenize_captions(tokenizer, dataset.texts, max_length)  # (num_texts, L) each
    loader = DataLoader(dataset, batch_size=image_batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_eval_images)
    return compute_features(model, (batch["image"] for batch in loader), tokens["input_ids"],
                            tokens["attention_mask"], text_batch_size=text_batch_size, device=device)
