"""Batching: stack images, tokenise captions with ALBEF's convention, and build the batch dict of docs/BATCH.md.

Batch keys: ``image`` (B, 3, H, W) float, ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64,
``image_ids`` (B,) int64, ``index`` (B,) int64 (position in the dataset), ``captions`` list[str].
Captions are padded to the longest in the batch and truncated to ``max_length`` tokens
([CLS] included): 30 for retrieval, 25 in pretraining, as ALBEF.
When the items carry the teacher's own views (see ``codis_lib.data.datasets``), the batch also has
``image_teacher`` (B, 3, H, W) and ``teacher_input_ids`` / ``teacher_attention_mask`` (B, L') with
``teacher_captions``, tokenised by the same rules (padded to the longest teacher caption).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

# Tokenising inside DataLoader workers after the parent used the tokenizer makes the Rust
# library warn about fork safety and disable its own threads; say so up front instead.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRETRAIN_MAX_LENGTH = 25
RETRIEVAL_MAX_LENGTH = 30


def tokenize_captions(tokenizer, captions: Sequence[str], max_length: int = RETRIEVAL_MAX_LENGTH) -> dict:
    """Return {"input_ids": (B, L) int64, "attention_mask": (B, L) int64}: [CLS] tokens, padded to the longest."""
    encoded = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}


class ImageTextCollator:
    """Collate training items {image, caption, image_id, index} into the batch dict of docs/BATCH.md."""

    def __init__(self, tokenizer, max_length: int = RETRIEVAL_MAX_LENGTH):
        if tokenizer.pad_token_id != 0:
            raise ValueError(f"tokenizer pad id is {tokenizer.pad_token_id}; the models here expect 0 (ALBEF/BERT)")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        captions = [item["caption"] for item in items]
        batch = {
            "image": torch.stack([item["image"] for item in items]),  # (B, 3, H, W)
            **tokenize_captions(self.tokenizer, captions, self.max_length),  # (B, L) each
            "image_ids": torch.tensor([item["image_id"] for item in items], dtype=torch.int64),  # (B,)
            "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),  # (B,)
            "captions": captions,
        }
        if "image_teacher" in items[0]:
            batch["image_teacher"] = torch.stack([_teacher_part(item, "image_teacher") for item in items])
        if "caption_teacher" in items[0]:
            teacher_captions = [_teacher_part(item, "caption_teacher") for item in items]
            encoded = tokenize_captions(self.tokenizer, teacher_captions, self.max_length)  # (B, L') each
            batch["teacher_input_ids"] = encoded["input_ids"]
            batch["teacher_attention_mask"] = encoded["attention_mask"]
            batch["teacher_captions"] = teacher_captions
        return batch


def _teacher_part(item: dict, key: str):
    """Return item[key], or raise KeyError naming the key and the item when only some items of the batch have it."""
    if key not in item:
        raise KeyError(f"item {item.get('index')} has no {key!r} but the first item of its batch has one")
    return item[key]


def collate_eval_images(items: Sequence[dict]) -> dict:
    """Collate evaluation items {image, index} into {"image": (B, 3, H, W), "index": (B,) int64}."""
    return {
        "image": torch.stack([item["image"] for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
    }
