"""Everyday words as queries: which emoji answer a word, hit@k, and its chance level."""
import itertools
import math

import pytest
import torch

from codis_lib.evaluation.word_queries import (EVERYDAY_WORDS, _chance_hit, answering_images, format_word_table,
                                               word_query_benchmark)


def test_a_word_is_answered_by_names_that_hold_it_whole_or_plural():
    names = ["cat face", "grinning cat with smiling eyes", "catalog", "two cats", "dog", "scaredy cat"]
    assert answering_images("cat", names) == [0, 1, 3, 5]
    assert answering_images("dog", names) == [4]
    assert answering_images("horse", names) == []


def test_chance_matches_counting_every_top_k():
    n, answering, k = 7, 2, 3
    hits = sum(any(i < answering for i in top) for top in itertools.combinations(range(n), k))
    assert _chance_hit(n, answering, k) == pytest.approx(hits / math.comb(n, k))


def test_the_word_list_is_everyday_and_long_enough():
    assert len(EVERYDAY_WORDS) >= 100 and len(set(EVERYDAY_WORDS)) == len(EVERYDAY_WORDS)
    assert all(word.isalpha() and word.islower() for word in EVERYDAY_WORDS)


class _WordModel(torch.nn.Module):
    """A text encoder whose feature for a word is a fixed random vector per token id (real tokenizer, real ranking)."""

    def __init__(self, vocab: int, dim: int = 16):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, dim)

    def encode_text(self, input_ids, attention_mask):
        feat = (self.table(input_ids) * attention_mask[..., None]).sum(1)
        return None, torch.nn.functional.normalize(feat, dim=-1)


def test_hit_at_k_is_perfect_when_images_sit_on_their_words_and_near_chance_when_random():
    from tests.fixtures_data.corpus import small_emoji_corpus
    from codis_lib import load_tokenizer

    out, _ = small_emoji_corpus()
    tokenizer = load_tokenizer(str(out / "tokenizer"))
    torch.manual_seed(0)
    model = _WordModel(len(tokenizer))
    words = ["cat", "dog", "heart", "sun", "car"]
    names = ["cat face", "dog face", "red heart", "sun with face", "police car", "tree", "moon", "apple"] * 3
    from codis_lib.evaluation.word_queries import rank_images_for_text

    word_feat = {}
    for word in words:  # an image's feature: its word's text feature (the perfect model)
        _, feat = model.encode_text(*_ids(tokenizer, word))
        word_feat[word] = feat[0]
    other = torch.nn.functional.normalize(torch.randn(16), dim=0)
    image_feat = torch.stack([next((word_feat[w] for w in words if w in name), other) for name in names])
    result = word_query_benchmark(model, tokenizer, image_feat, names, gallery="toy", words=words + ["zebra"], k=1)
    assert result.hit_at_k == 100.0 and result.words_scored == 5 and result.words_unanswered == ["zebra"]
    assert result.chance == pytest.approx(100 * 3 / 24)
    assert "toy" in format_word_table([result]) and "hit@1 100.0 %" in format_word_table([result])
    shuffled = image_feat[torch.randperm(len(names))]
    assert rank_images_for_text(model, tokenizer, shuffled, ["cat"]).shape == (1, len(names))
    from codis_lib.evaluation.word_queries import text_image_similarity

    scores = text_image_similarity(model, tokenizer, image_feat, ["cat", "sun"])
    assert scores.shape == (2, len(names)) and not scores.requires_grad  # a query builds no graph
    assert torch.allclose(scores[0], image_feat @ word_feat["cat"], atol=1e-5)
    with pytest.raises(ValueError, match="toy"):
        word_query_benchmark(model, tokenizer, image_feat[:3], names, gallery="toy")


def _ids(tokenizer, text):
    from codis_lib.data.collate import tokenize_captions

    tokens = tokenize_captions(tokenizer, [text])
    return tokens["input_ids"], tokens["attention_mask"]


def test_gallery_names_are_the_cldr_names_of_the_split_images_in_order():
    from codis_lib import RetrievalEvalDataset
    from codis_lib.evaluation.word_queries import gallery_names
    from tests.fixtures_data.corpus import small_emoji_corpus

    out, manifest = small_emoji_corpus()
    dataset = RetrievalEvalDataset(out / "new_drawings.json", None, image_size=32)
    names = gallery_names(dataset, out / "manifest.json")
    by_key = {e["key"]: e["name"] for e in manifest["emoji"]}
    assert names == [by_key[record.image.rsplit("/", 1)[1][:-4]] for record in dataset.records]
    assert names and all(name == name.strip() and name for name in names)
    broken = out.parent / "other_manifest.json"
    broken.write_text('{"emoji": []}')
    with pytest.raises(ValueError, match="other_manifest.json"):
        gallery_names(dataset, broken)
