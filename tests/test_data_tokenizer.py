"""WordPiece tokenizer: ALBEF's '[CLS] tokens' convention, pad id 0, truncation, save/load, offline errors."""
import pytest

from codis_lib.data.collate import tokenize_captions
from codis_lib.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids, train_wordpiece

CAPTIONS = [
    "grinning face", "grinning face with big eyes", "woman technologist medium skin tone",
    "man technologist", "flag japan", "red heart", "thumbs up dark skin tone", "baby chick",
    "people & body emoji technologist", "face with tears of joy",
] * 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_wordpiece(CAPTIONS, vocab_size=300, out_dir=out), out


def test_special_tokens_have_fixed_ids(tokenizer):
    tok, _ = tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = special_token_ids(tok)
    assert ids["pad_token_id"] == 0 and ids["cls_token_id"] == 2 and ids["sep_token_id"] == 3
    assert ids["mask_token_id"] == 4 and ids["vocab_size"] == len(tok) <= 300


def test_albef_convention_cls_first_no_sep_pad_zero(tokenizer):
    tok, _ = tokenizer
    batch = tokenize_captions(tok, ["red heart", "woman technologist medium skin tone"], max_length=30)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == ids.new_zeros(()).long().dtype
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert not (ids == tok.sep_token_id).any()
    assert ids.shape[1] == 1 + len(tok.tokenize("woman technologist medium skin tone"))  # padded to the longest
    assert (ids[mask == 0] == 0).all() and mask[0].sum() == 1 + len(tok.tokenize("red heart"))
    assert tok.decode(ids[0], skip_special_tokens=True) == "red heart"


def test_truncation_counts_cls(tokenizer):
    tok, _ = tokenizer
    long_caption = " ".join(["grinning face"] * 30)
    batch = tokenize_captions(tok, [long_caption, "red heart"], max_length=25)
    assert batch["input_ids"].shape == (2, 25)
    assert batch["attention_mask"][0].sum() == 25 and batch["input_ids"][0, 0] == tok.cls_token_id
    assert batch["input_ids"][0, -1] != tok.sep_token_id


def test_unseen_words_are_spelt_in_pieces_not_unk(tokenizer):
    tok, _ = tokenizer
    pieces = tok.tokenize("giraffe zebra 42")
    assert tok.unk_token not in pieces and len(pieces) > 3
    assert tok.tokenize("Côte") == tok.tokenize("cote")  # BERT-uncased normalisation: lower case, accents stripped


def test_save_and_load_round_trip(tokenizer):
    tok, folder = tokenizer
    loaded = load_tokenizer(folder)
    text = ["thumbs up dark skin tone", "baby"]
    assert loaded(text, padding="longest")["input_ids"] == tok(text, padding="longest")["input_ids"]
    assert loaded("baby")["input_ids"][0] == loaded.cls_token_id and loaded.pad_token_id == 0


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer(tmp_path / "no-such-tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(RuntimeError, match="allow_download=True"):
        load_tokenizer("bert-base-uncased", cache_dir=tmp_path / "empty-hf-cache")  # offline by default


def test_train_wordpiece_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no captions"):
        train_wordpiece([], vocab_size=300)
    with pytest.raises(ValueError, match="too small"):
        train_wordpiece(CAPTIONS, vocab_size=50)


def test_training_is_deterministic_and_learns_frequent_words():
    from codis_lib.data.tokenizer import learn_wordpiece_vocab

    first = train_wordpiece(CAPTIONS, vocab_size=300).get_vocab()
    assert train_wordpiece(list(reversed(CAPTIONS)), vocab_size=300).get_vocab() == first  # order and run free
    assert {"technologist", "grinning", "face"} <= set(first)  # frequent words become single pieces
    vocab = learn_wordpiece_vocab({"low": 5, "lower": 2, "newest": 6, "widest": 3}, vocab_size=30)
    assert vocab[:5] == list(SPECIAL_TOKENS) and "##est" in vocab and "low" in vocab
    with pytest.raises(ValueError, match="alphabet alone"):
        learn_wordpiece_vocab({"abc": 1}, vocab_size=10, alphabet="xyz")
