"""WordPiece tokenizer trained on captions, in Hugging Face format, with ALBEF's ``[CLS] tokens`` convention.

ALBEF's own BertTokenizer (``models/tokenization_bert.py``) builds a single sequence as
``[CLS] X`` with no trailing ``[SEP]``; captions are padded to the longest in the batch and
truncated to 30 tokens (25 in pretraining). We keep that convention for every tokenizer this
project loads: the trained one and, when asked for by name, ``bert-base-uncased``.

Special tokens and their ids in a trained tokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
``[SEP]`` is in the vocabulary (BERT checkpoints have it) but never emitted for a caption.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # annotations only: building the corpus must not pay for the run config's imports
    from codis_lib.run_config import RunConfig

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, in this order
TOKENIZER_RECIPE = 3  # bump when train_wordpiece changes what it learns: corpora built before retrain theirs
ALBEF_MAX_LENGTH = 30  # retrieval; pretraining uses 25
HUB_TOKENIZERS = ("bert-base-uncased",)


def apply_albef_convention(tokenizer, max_length: int = ALBEF_MAX_LENGTH):
    """Return ``tokenizer`` (changed in place) encoding one text as ``[CLS] tokens``: no ``[SEP]``, pad id as its vocab says."""
    from tokenizers import processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"expected a tokenizers-backed (fast) tokenizer, got {type(tokenizer).__name__}")
    cls_token, sep_token = tokenizer.cls_token, tokenizer.sep_token
    if cls_token is None or tokenizer.cls_token_id is None:
        raise ValueError("tokenizer has no [CLS] token: ALBEF's convention needs one")
    special = [(cls_token, tokenizer.cls_token_id)]
    pair = f"{cls_token} $A"
    if sep_token is not None and tokenizer.sep_token_id is not None:
        special.append((sep_token, tokenizer.sep_token_id))
        pair = f"{cls_token} $A {sep_token} $B:1 {sep_token}:1"
    backend.post_processor = processors.TemplateProcessing(single=f"{cls_token} $A", pair=pair, special_tokens=special)
    tokenizer.model_max_length = max_length
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    return tokenizer


def _check_convention(tokenizer, where: str) -> None:
    ids = tokenizer("a")["input_ids"]
    if not ids or ids[0] != tokenizer.cls_token_id or (tokenizer.sep_token_id is not None and tokenizer.sep_token_id in ids):
        raise RuntimeError(f"{where}: tokenizer does not follow ALBEF's '[CLS] tokens' convention: 'a' -> {ids}")


def learn_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int, alphabet: Iterable[str] = (),
                          min_frequency: int = 1) -> list[str]:
    """Return a WordPiece vocabulary (special tokens first) learnt by deterministic pair merges over ``word_counts``.

    The algorithm of Hugging Face's WordPieceTrainer (BPE merges on words spelt as ``w ##o ##r ##d``,
    the most frequent adjacent pair first), with ties broken by the pair itself, so the same
    captions always give the same vocabulary: the Rust trainer breaks ties by hash-map order and
    gives a slightly different vocabulary (3167 or 3168 pieces for the emoji captions) run to run.
    Every alphabet character is kept both as a word start and as a ``##`` continuation.
    """
    import heapq

    words = [[w[0]] + ["##" + ch for ch in w[1:]] for w in word_counts]  # symbols of each distinct word
    counts = list(word_counts.values())
    symbols = {sym for word in words for sym in word}
    symbols |= {piece for ch in alphabet for piece in (ch, "##" + ch)}
    vocab = list(SPECIAL_TOKENS) + sorted(symbols)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: the special tokens and the alphabet alone take {len(vocab)} pieces")
    known = set(vocab)
    pair_count: dict[tuple[str, str], int] = {}
    pair_words: dict[tuple[str, str], set[int]] = {}
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_count[pair] = pair_count.get(pair, 0) + counts[index]
            pair_words.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative or -negative <= 0:
            continue  # stale heap entry
        if -negative < min_frequency:
            break
        merged = pair[0] + pair[1][2:]  # "gi" + "##raffe" -> "giraffe"; "##ra" + "##ffe" -> "##raffe"
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed: set[tuple[str, str]] = set()
        for index in sorted(pair_words.pop(pair, ())):
            word, count = words[index], counts[index]
            for old in zip(word, word[1:]):  # withdraw the word's pairs ...
                pair_count[old] -= count
                changed.add(old)
                if old in pair_words:
                    pair_words[old].discard(index)
            rebuilt, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    rebuilt.append(merged)
                    i += 2
                else:
                    rebuilt.append(word[i])
                    i += 1
            words[index] = rebuilt
            for new in zip(rebuilt, rebuilt[1:]):  # ... and count the merged word's pairs
                pair_count[new] = pair_count.get(new, 0) + count
                pair_words.setdefault(new, set()).add(index)
                changed.add(new)
        pair_count.pop(pair, None)
        for other in changed:
            if pair_count.get(other, 0) > 0:
                heapq.heappush(heap, (-pair_count[other], other))
    return vocab


def train_wordpiece(
    captions: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 1,
    max_length: int = ALBEF_MAX_LENGTH,
):
    """Return a PreTrainedTokenizerFast with a WordPiece vocabulary learnt from ``captions``; saved to ``out_dir`` if given.

    BERT-uncased normalisation (lower case, accents stripped) and pre-tokenisation (split on
    whitespace and punctuation), then deterministic merges (``learn_wordpiece_vocab``). The
    alphabet holds every printable ASCII character as a word start and as a continuation, so
    words never seen in training (held-out test concepts) are spelt out in pieces instead of
    becoming [UNK]. Pass the TRAINING captions only: the vocabulary must not see the test split.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 200:
        raise ValueError(f"vocab_size={vocab_size}: too small (the ASCII alphabet alone takes 141 pieces; use >= 200)")
    captions = [c for c in captions]
    if not captions:
        raise ValueError("train_wordpiece: no captions given")
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts = Counter(
        word for caption in captions for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = learn_wordpiece_vocab(dict(sorted(word_counts.items())), vocab_size, alphabet, min_frequency)
    backend = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]",
                                         continuing_subword_prefix="##", max_input_chars_per_word=100))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix="##")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} got id {backend.token_to_id(token)}, expected {expected_id}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=max_length,
    )
    apply_albef_convention(tokenizer, max_length)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path_or_name: str | os.PathLike, *, allow_download: bool = False, max_length: int = ALBEF_MAX_LENGTH,
                   cache_dir: str | os.PathLike | None = None):
    """Return the tokenizer saved in a folder, or ``bert-base-uncased`` by name, with ALBEF's convention applied.

    A folder (e.g. ``data/emoji/tokenizer``) is read offline. ``"bert-base-uncased"`` is read from
    the local Hugging Face cache (or ``cache_dir``); it is downloaded only with ``allow_download=True``.
    A packaged model's name (``"minilm"``, `codis_lib.data.packaged`) reads the tokenizer in its package.
    """
    from transformers import AutoTokenizer

    from codis_lib.data.packaged import is_packaged_name, packaged_model_dir

    text = str(path_or_name)
    path = Path(text).expanduser()
    if is_packaged_name(text) and not path.exists():
        path = packaged_model_dir(text, key="data.tokenizer")
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json here (is it a folder written by train_wordpiece?)")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        where = str(path)
    elif text in HUB_TOKENIZERS:
        try:
            tokenizer = AutoTokenizer.from_pretrained(text, local_files_only=not allow_download,
                                                      cache_dir=None if cache_dir is None else str(cache_dir))
        except OSError as err:
            raise RuntimeError(
                f"tokenizer {text!r} is not in the local Hugging Face cache and downloads are off "
                f"(this project runs offline by default). Either pass allow_download=True on a machine "
                f"with internet access, or use the tokenizer trained with the emoji corpus "
                f"(data/emoji/tokenizer, made by codis-build-emoji)."
            ) from err
        where = text
    else:
        raise FileNotFoundError(
            f"tokenizer {text!r}: no such folder, and not one of the hub names {HUB_TOKENIZERS}; "
            f"build the emoji corpus (codis-build-emoji) to get data/emoji/tokenizer"
        )
    apply_albef_convention(tokenizer, max_length)
    _check_convention(tokenizer, where)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{where}: tokenizer has no [PAD] token")
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Return vocab_size and the ids of [PAD], [UNK], [CLS], [SEP], [MASK]: what ModelConfig needs from a tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "unk_token_id": tokenizer.unk_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }


def tokenizer_location(config: RunConfig) -> str:
    """Return the tokenizer folder or hub name a run uses: data.tokenizer, else the emoji corpus's own."""
    if config.data.tokenizer is not None:
        return config.data.tokenizer
    if config.data.dataset == "emoji":
        return str(Path(config.data.root) / "tokenizer")
    from codis_lib.typed_config import ConfigError

    raise ConfigError("data.tokenizer: needed for albef_json data")
