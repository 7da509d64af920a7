"""Everyday words as queries: does the model find a cat when a student types "cat"?

The retrieval splits query with the corpus's own captions (CLDR names and their variants), the text
the model was trained on. A student types single everyday words. This benchmark takes its words from
a list written for it (``EVERYDAY_WORDS``: common English nouns of a first-reader vocabulary, chosen
without looking at the model's results; not taken from the training captions), and decides what
answers a word from Unicode's CLDR short name of each gallery emoji: an emoji answers "cat" when its
name holds the whole word "cat" (or its plural: "cats"). Words no gallery emoji answers are left out
of that gallery's score, and said so.

``hit@k``: the share of scored words whose top k images (contrastive similarity, the model's
``encode_text`` of the bare word against every gallery image) hold at least one image that answers
it. ``chance``: the same share for a random ranking, from each word's count of answering images.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["EVERYDAY_WORDS", "WordQueryResult", "answering_images", "word_query_benchmark",
           "format_word_table", "rank_images_for_text"]

EVERYDAY_WORDS = (
    # animals
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "mouse", "rabbit", "bear", "monkey", "bird", "fish",
    "frog", "snake", "lion", "tiger", "fox", "wolf", "elephant", "whale", "dolphin", "bee", "bug", "spider",
    "chicken", "duck", "owl", "penguin", "turtle", "camel", "giraffe", "zebra", "dragon", "unicorn",
    # food and drink
    "apple", "banana", "grapes", "lemon", "peach", "cherries", "strawberry", "tomato", "carrot", "corn",
    "bread", "cheese", "egg", "cake", "cookie", "candy", "pizza", "burger", "rice", "soup", "coffee", "tea", "milk",
    "wine", "beer", "water",
    # people and body
    "man", "woman", "baby", "child", "girl", "boy", "person", "family", "hand", "face", "eye", "ear", "nose",
    "mouth", "foot", "heart", "teacher", "doctor", "farmer", "cook", "police", "judge", "pilot", "artist", "singer",
    # things
    "car", "bus", "train", "airplane", "ship", "boat", "bicycle", "house", "school", "hospital", "bank", "church",
    "phone", "computer", "book", "clock", "key", "lock", "bell", "ball", "gift", "money", "camera", "television",
    "hat", "shoe", "shirt", "dress", "ring", "umbrella", "bed", "door", "chair", "knife", "pen",
    # nature and weather
    "sun", "moon", "star", "cloud", "rain", "snow", "fire", "tree", "flower", "leaf", "mountain", "sea",
    # feelings and play
    "smile", "laughing", "crying", "angry", "sleeping", "kiss", "music", "guitar", "football", "dance",
)


@dataclass
class WordQueryResult:
    """hit@k of the word queries on one gallery."""

    gallery: str
    k: int
    words_scored: int
    words_unanswered: list[str]  # words no image of this gallery answers (not scored)
    hit_at_k: float  # % of scored words with an answering image in their top k
    chance: float  # % expected from a random ranking
    hits: dict[str, bool]
    top_names: dict[str, list[str]]  # each word's top-k images, by CLDR name (unanswered words too)

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.__dataclass_fields__}


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(word.lower())}(?:s|es)?\b")


def answering_images(word: str, names: list[str]) -> list[int]:
    """Return the indices of the names that hold ``word`` (or its plural) as a whole word."""
    pattern = _word_pattern(word)
    return [i for i, name in enumerate(names) if pattern.search(name.lower())]


def gallery_names(dataset, manifest_path: str | Path) -> list[str]:
    """Return the CLDR short name of each image of an emoji evaluation dataset, from the corpus manifest."""
    manifest_path = Path(manifest_path)
    try:
        by_key = {e["key"]: e["name"] for e in json.loads(manifest_path.read_text(encoding="utf-8"))["emoji"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path}: not a readable emoji corpus manifest ({error})") from None
    names = []
    for record in dataset.records:
        key = Path(record.image).stem
        if key not in by_key:
            raise ValueError(f"{manifest_path}: no emoji {key!r} (image {record.image}): a manifest of another corpus")
        names.append(by_key[key])
    return names


def rank_images_for_text(model, tokenizer, image_feat: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Return, for each text, the gallery's image indices sorted by contrastive similarity (best first)."""
    return text_image_similarity(model, tokenizer, image_feat, texts).argsort(dim=1, descending=True)


@torch.no_grad()
def text_image_similarity(model, tokenizer, image_feat: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Return the (texts, images) contrastive similarities of each text's feature with the gallery's unit features."""
    from codis_lib.data.collate import tokenize_captions

    tokens = tokenize_captions(tokenizer, texts)
    device = image_feat.device
    was_training = model.training
    model.eval()
    try:
        _, text_feat = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    finally:
        model.train(was_training)
    return text_feat @ image_feat.t()


def _chance_hit(num_images: int, answering: int, k: int) -> float:
    """Return P(at least one of `answering` images among k drawn at random of `num_images`)."""
    if answering == 0:
        return 0.0
    k = min(k, num_images)
    return 1.0 - math.comb(num_images - answering, k) / math.comb(num_images, k)


def word_query_benchmark(model, tokenizer, image_feat: torch.Tensor, names: list[str], *, gallery: str,
                         words=EVERYDAY_WORDS, k: int = 5) -> WordQueryResult:
    """Return hit@k of ``words`` on a gallery of unit image features whose CLDR names are ``names``."""
    if image_feat.shape[0] != len(names):
        raise ValueError(f"{gallery}: {image_feat.shape[0]} image features but {len(names)} names")
    answers = {word: set(answering_images(word, names)) for word in words}
    scored = [word for word in words if answers[word]]
    unanswered = [word for word in words if not answers[word]]
    order = dict(zip(words, rank_images_for_text(model, tokenizer, image_feat, list(words))[:, :k].tolist()))
    hits = {word: any(i in answers[word] for i in order[word]) for word in scored}
    chance = sum(_chance_hit(len(names), len(answers[w]), k) for w in scored) / max(len(scored), 1)
    return WordQueryResult(gallery=gallery, k=k, words_scored=len(scored), words_unanswered=unanswered,
                           hit_at_k=100.0 * sum(hits.values()) / len(scored) if scored else float("nan"),
                           chance=100.0 * chance, hits=hits,
                           top_names={word: [names[i] for i in order[word]] for word in words})


def format_word_table(results: list[WordQueryResult]) -> str:
    """Return one line per gallery: hit@k with chance beside it, and how many words were scored."""
    lines = ["Everyday word queries (codis_lib.evaluation.word_queries): an emoji answers a word its CLDR name holds"]
    for r in results:
        lines.append(f"  {r.gallery:<15s} hit@{r.k} {r.hit_at_k:5.1f} %  (chance {r.chance:4.1f} %; "
                     f"{r.words_scored} words scored, {len(r.words_unanswered)} unanswered in this gallery)")
    return "\n".join(lines)


WORD_GALLERIES = ("new_drawings", "new_style")  # known concepts: a word names something the model was taught


@torch.no_grad()
def gallery_image_features(model, dataset, *, batch_size: int = 128, device=None) -> torch.Tensor:
    """Return the unit contrastive features (num_images, d) of an evaluation dataset's images, in order."""
    from torch.utils.data import DataLoader

    from codis_lib.data.collate import collate_eval_images
    from codis_lib.evaluation.features import encode_images

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_eval_images)
        return encode_images(model, (batch["image"] for batch in loader), device)[1]
    finally:
        model.train(was_training)


def word_query_report(model, tokenizer, config, splits, *, words=EVERYDAY_WORDS, k: int = 5,
                      device=None) -> list[WordQueryResult]:
    """Return the word benchmark on each emoji gallery of ``splits`` that is one of ``WORD_GALLERIES``."""
    from codis_lib.evaluation.report import retrieval_split_dataset

    if config.data.dataset != "emoji":
        return []
    results = []
    for split in [s for s in splits if s in WORD_GALLERIES]:
        dataset = retrieval_split_dataset(config, split)
        names = gallery_names(dataset, Path(config.data.root) / "manifest.json")
        feats = gallery_image_features(model, dataset, batch_size=config.train.eval.batch_size, device=device)
        results.append(word_query_benchmark(model, tokenizer, feats, names, gallery=split, words=words, k=k))
    return results
