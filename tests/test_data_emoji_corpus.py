"""Emoji corpus: concept splits and held-out drawings over the FULL emoji list (no rendering), small real builds."""
import json
from collections import Counter, defaultdict

import pytest
from PIL import Image

from codis_lib.data import emoji_corpus as ec
from codis_lib.data.albef_json import pre_caption, read_pretrain_annotations, read_retrieval_eval, read_retrieval_train
from tests.fixtures_data.corpus import SMALL_CORPUS_LIMIT, SMALL_CORPUS_SIZE, small_emoji_corpus


@pytest.fixture(scope="module")
def full_plan():
    """The plan of the full corpus (every emoji of both art sets): splits and captions, nothing rendered."""
    return ec.plan_corpus(image_size=64)


def _by_name(plan):
    return {e.name: e for e in plan["emojis"]}


# ---------------------------------------------------------------------------------------------
# Full list, no rendering


def test_full_list_counts_and_both_art_sets(full_plan):
    emojis = full_plan["emojis"]
    assert len(emojis) > 3500  # Unicode 17 lists 3944 fully-qualified emoji; both packages draw nearly all
    assert len(emojis) <= full_plan["emoji_listed"]
    images = Counter((split, style) for split, style, _ in full_plan["images"])
    # both styles of every training emoji, in training or (one of them) in new_drawings
    assert (images[("train", "twemoji")] + images[("new_drawings", "twemoji")]
            == images[("train", "openmoji")] + images[("new_drawings", "openmoji")]
            == sum(1 for e in emojis if full_plan["splits"][e.key] == "train"))
    test_images = images[("test", "twemoji")] + images[("test", "openmoji")]
    assert 950 <= test_images <= 1050  # about a thousand, like Flickr30K
    assert min(images[("test", "twemoji")], images[("test", "openmoji")]) > 0.4 * test_images
    assert 450 <= images[("val", "twemoji")] + images[("val", "openmoji")] <= 550


def test_splits_share_no_base_concept(full_plan):
    split_of_concept = defaultdict(set)
    for e in full_plan["emojis"]:
        split_of_concept[full_plan["concepts"][e.key]].add(full_plan["splits"][e.key])
    mixed = {c: s for c, s in split_of_concept.items() if len(s) > 1}
    assert not mixed
    assert set(full_plan["splits"].values()) == {"train", "val", "test"}


def test_skin_tone_gender_and_hair_variants_share_the_split(full_plan):
    by_name = _by_name(full_plan)
    splits = full_plan["splits"]
    checked = 0
    for name, e in by_name.items():
        base, _, qualifier = name.partition(": ")
        if "skin tone" in qualifier and base in by_name:  # "thumbs up: dark skin tone" -> "thumbs up"
            assert splits[e.key] == splits[by_name[base].key], name
            checked += 1
        for gendered in ("man ", "woman "):  # "woman technologist" -> "technologist" / "person ..."
            if name.startswith(gendered):
                neutral = name[len(gendered):]
                for candidate in (neutral, "person " + neutral):
                    if candidate in by_name:
                        assert splits[e.key] == splits[by_name[candidate].key], (name, candidate)
                        checked += 1
    assert checked > 1000
    families = [
        ("thumbs up", "thumbs up: dark skin tone"),
        ("technologist", "woman technologist: medium skin tone", "man technologist"),
        ("Santa Claus", "Mrs. Claus", "Mx Claus"),
        ("people holding hands", "men holding hands", "women holding hands", "woman and man holding hands"),
        ("person", "man", "woman", "man: red hair", "woman: curly hair", "person: beard"),
        ("person running", "man running facing right", "woman running: light skin tone"),
        ("prince", "princess", "person with crown"),
        ("merperson", "merman", "mermaid"),
        ("kiss", "kiss: woman, man"),
    ]
    for family in families:
        assert len({splits[by_name[name].key] for name in family}) == 1, family
        assert len({full_plan["concepts"][by_name[name].key] for name in family}) == 1, family


def test_distinct_concepts_are_not_merged(full_plan):
    concepts = {e.name: full_plan["concepts"][e.key] for e in full_plan["emojis"]}
    assert concepts["flag: Japan"] != concepts["flag: France"]
    assert concepts["left arrow"] != concepts["right arrow"]
    assert concepts["baby"] != concepts["child"]
    assert concepts["old key"] != concepts["older person"]


def test_splits_are_deterministic(full_plan):
    again = ec.plan_corpus(image_size=64)
    assert again["splits"] == full_plan["splits"]
    assert again["captions"] == full_plan["captions"]
    assert again["held_out"] == full_plan["held_out"]


def test_captions_are_non_empty_and_names_unique_after_cleaning(full_plan):
    captions = full_plan["captions"]
    assert all(captions[e.key] for e in full_plan["emojis"])
    assert all(pre_caption(c) for cs in captions.values() for c in cs)
    first = Counter(pre_caption(captions[e.key][0]) for e in full_plan["emojis"])
    assert max(first.values()) == 1  # in retrieval a caption must point at exactly one image
    owners = defaultdict(set)
    for key, cs in captions.items():
        for c in cs:
            owners[pre_caption(c)].add(key)
    assert max(len(o) for o in owners.values()) == 1
    by_name = _by_name(full_plan)
    assert captions[by_name["keycap: #"].key][0] == "keycap: number sign"  # '#' would be deleted by cleaning
    giraffe = captions[by_name["giraffe"].key]
    assert giraffe[:3] == ["giraffe", "giraffe, an animal mammal emoji", "animals & nature emoji: giraffe"]


def test_new_drawings_hold_out_one_drawing_of_about_a_thousand_training_emoji(full_plan):
    held_out, splits = full_plan["held_out"], full_plan["splits"]
    assert 950 <= len(held_out) <= 1050
    assert all(splits[key] == "train" for key in held_out)  # familiar concepts only
    styles = Counter(held_out.values())
    assert set(styles) == set(ec.ART_STYLES) and abs(styles["twemoji"] - styles["openmoji"]) <= 1
    image_split = {(style, e.key): split for split, style, e in full_plan["images"]}
    for key, style in held_out.items():
        other = next(s for s in ec.ART_STYLES if s != style)
        assert image_split[(style, key)] == "new_drawings" and image_split[(other, key)] == "train"
    assert sum(1 for split in image_split.values() if split == "new_drawings") == len(held_out)


def test_new_drawings_are_spread_over_groups_and_concepts(full_plan):
    train = [e for e in full_plan["emojis"] if full_plan["splits"][e.key] == "train"]
    held = [e for e in train if e.key in full_plan["held_out"]]
    train_groups, held_groups = Counter(e.group for e in train), Counter(e.group for e in held)
    for group, size in train_groups.items():  # each CLDR group in proportion to its training emoji
        assert abs(held_groups[group] - size * len(held) / len(train)) <= 1, group
    concepts = Counter(full_plan["concepts"][e.key] for e in held)
    assert len(concepts) > 450  # of 1045 training concepts: one variant of a concept before a second
    assert max(concepts.values()) <= 10


def test_tokenizer_captions_do_not_depend_on_the_held_out_drawings(full_plan):
    none_held = ec.plan_corpus(image_size=64, new_drawings_images=0)
    assert not none_held["held_out"] and none_held["splits"] == full_plan["splits"]
    # with nothing held out the tokenizer's text is train.json's captions, as before new_drawings existed
    expected = [pre_caption(c) for split, _, e in none_held["images"] if split == "train"
                for c in none_held["captions"][e.key]]
    assert ec.tokenizer_captions(full_plan) == ec.tokenizer_captions(none_held) == expected


# ---------------------------------------------------------------------------------------------
# A small real build (--limit), shared by the data tests


@pytest.fixture(scope="module")
def small():
    return small_emoji_corpus()


def test_small_build_counts_match_files(small):
    out, manifest = small
    counts = manifest["counts"]
    assert SMALL_CORPUS_LIMIT * 0.8 <= counts["emoji"] <= SMALL_CORPUS_LIMIT
    pretrain = json.loads((out / "pretrain.json").read_text())
    train = json.loads((out / "train.json").read_text())
    val = json.loads((out / "val.json").read_text())
    test = json.loads((out / "test.json").read_text())
    new_drawings = json.loads((out / "new_drawings.json").read_text())
    split = counts["splits"]
    assert set(split) == {"train", "val", "test", "new_drawings"}  # the --limit build has all four splits
    assert len(pretrain) == split["train"]["images"] == counts["pretrain_records"]
    # both drawings of each caption, less the drawings held out as new_drawings
    assert len(train) == split["train"]["records"] == split["train"]["captions"] * 2 - split["new_drawings"]["captions"]
    assert len(val) == split["val"]["images"] > 0 and len(test) == split["test"]["images"] > 0
    assert len(new_drawings) == split["new_drawings"]["images"] == split["new_drawings"]["emoji"] > 0
    per_style = {s: split["train"]["images_per_style"][s] + split["new_drawings"]["images_per_style"][s]
                 for s in ec.ART_STYLES}
    assert per_style["twemoji"] == per_style["openmoji"] == split["train"]["emoji"] > 0
    assert counts["images"] == len(manifest["images"]) == sum(s["images"] for s in split.values())
    assert manifest["format"] == ec.MANIFEST_FORMAT == 2


def test_small_build_every_image_opens_and_every_caption_is_non_empty(small):
    out, manifest = small
    white_corners = 0
    for relative in manifest["images"]:
        with Image.open(out / relative) as image:
            image.load()
            assert image.size == (SMALL_CORPUS_SIZE, SMALL_CORPUS_SIZE) and image.mode == "RGB"
            assert image.getextrema() != ((255, 255),) * 3  # something is drawn
            white_corners += image.getpixel((0, 0)) == (255, 255, 255)
    assert white_corners >= 0.8 * len(manifest["images"])  # white ground (a few drawings fill the frame)
    assert len(read_pretrain_annotations(out / "pretrain.json")) == manifest["counts"]["pretrain_records"]
    for record in read_retrieval_train(out / "train.json"):
        assert record.caption
    for name in ("val.json", "test.json", "new_drawings.json"):
        for record in read_retrieval_eval(out / name):
            assert record.captions and all(record.captions)


def test_small_build_splits_share_no_base_concept_and_match_the_full_plan(small, full_plan):
    out, manifest = small
    concepts = defaultdict(set)
    for row in manifest["emoji"]:
        concepts[row["base_concept"]].add(row["split"])
        assert row["split"] == full_plan["splits"][row["key"]]  # a subset agrees with the full corpus
    assert all(len(s) == 1 for s in concepts.values())
    train_images = {r["image"] for r in json.loads((out / "train.json").read_text())}
    test_images = {r["image"] for r in json.loads((out / "test.json").read_text())}
    assert not train_images & test_images


def test_small_build_new_drawings_are_held_out_of_training(small, full_plan):
    out, manifest = small
    pretrain = {r["image"]: r["caption"] for r in json.loads((out / "pretrain.json").read_text())}
    train_images = {r["image"] for r in json.loads((out / "train.json").read_text())}
    new_drawings = json.loads((out / "new_drawings.json").read_text())
    held = {row["key"]: row for row in manifest["emoji"] if row["held_out_style"] is not None}
    assert len(held) == len(new_drawings) and {row["held_out_style"] for row in held.values()} == set(ec.ART_STYLES)
    for record in new_drawings:
        assert record["image"] not in pretrain and record["image"] not in train_images
        style, name = record["image"].split("/")[1:]
        key = name[: -len(".png")]
        assert held[key]["held_out_style"] == style == full_plan["held_out"][key]  # as in the full corpus
        assert held[key]["split"] == "train"  # the concept is a training concept
        other = next(s for s in ec.ART_STYLES if s != style)
        assert pretrain[f"images/{other}/{key}.png"] == record["caption"]  # same captions, with the other drawing
    assert all(row["held_out_style"] is None for row in manifest["emoji"] if row["split"] != "train")
    assert manifest["tokenizer"]["training_captions"] == manifest["counts"]["splits"]["train"]["captions"] * 2


def test_emoji_split_file_names_the_evaluation_files_and_how_to_rebuild(small, tmp_path):
    out, _ = small
    for split in ("val", "test", "new_drawings"):
        assert ec.emoji_split_file(out, split) == out / f"{split}.json"
    for split in ("train", "pretrain", "bogus"):
        with pytest.raises(ValueError, match="val, test, new_drawings"):
            ec.emoji_split_file(out, split)
    old = tmp_path / "old"  # a folder of the format-1 builder: val and test, no new_drawings
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": 1}))
    (old / "val.json").write_text("[]")
    assert ec.emoji_split_file(old, "val") == old / "val.json"
    with pytest.raises(FileNotFoundError, match="manifest format 1") as error:
        ec.emoji_split_file(old, "new_drawings")
    assert "codis-build-emoji" in str(error.value) and "--force" in str(error.value) and "\n" not in str(error.value)


def test_rebuild_reuses_verified_images_and_repairs_altered_ones(tmp_path):
    out = tmp_path / "emoji"
    first = ec.build_emoji_corpus(out, 16, limit=12, vocab_size=300, workers=1)
    assert first["last_build"]["images_rendered"] == first["counts"]["images"]
    second = ec.build_emoji_corpus(out, 16, limit=12, vocab_size=300, workers=1)
    assert second["last_build"]["images_rendered"] == 0
    assert second["last_build"]["tokenizer_reused"] is True
    assert second["images"] == first["images"] and second["files"] == first["files"]
    victim = sorted(first["images"])[0]
    (out / victim).write_bytes(b"not a png any more")
    third = ec.build_emoji_corpus(out, 16, limit=12, vocab_size=300, workers=1)
    assert third["last_build"]["images_rendered"] == 1
    assert third["images"][victim] == first["images"][victim]  # re-rendered to the same bytes
    with pytest.raises(ValueError, match="force"):
        ec.build_emoji_corpus(out, 24, limit=12, vocab_size=300, workers=1)  # other settings: refused
    elsewhere = ec.build_emoji_corpus(tmp_path / "again", 16, limit=12, vocab_size=300, workers=1)
    assert elsewhere["images"] == first["images"] and elsewhere["files"] == first["files"]  # byte-identical builds
    assert elsewhere["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    assert "new_drawings.json" in first["files"] and elsewhere["emoji"] == first["emoji"]  # held-out drawings too


def test_held_out_drawings_change_only_the_training_files(tmp_path):
    held = ec.build_emoji_corpus(tmp_path / "held", 16, limit=12, vocab_size=300, workers=1)
    kept = ec.build_emoji_corpus(tmp_path / "kept", 16, limit=12, vocab_size=300, workers=1, new_drawings_images=0)
    assert held["counts"]["splits"]["new_drawings"]["images"] > 0 == kept["counts"]["splits"]["new_drawings"]["images"]
    assert held["images"] == kept["images"]  # the same drawings, only filed elsewhere
    for name in ("val.json", "test.json"):
        assert held["files"][name] == kept["files"][name]
    for name in ("pretrain.json", "train.json"):
        assert held["files"][name] != kept["files"][name]
    assert held["tokenizer"] == kept["tokenizer"]  # same training captions: same vocabulary, same file


def test_a_folder_of_the_older_builder_is_refused_unless_forced(tmp_path):
    out = tmp_path / "emoji"
    ec.build_emoji_corpus(out, 16, limit=8, vocab_size=300, workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest format 1.*--force"):
        ec.build_emoji_corpus(out, 16, limit=8, vocab_size=300, workers=1)
    rebuilt = ec.build_emoji_corpus(out, 16, limit=8, vocab_size=300, workers=1, force=True)
    assert rebuilt["format"] == 2 and rebuilt["last_build"]["images_rendered"] == rebuilt["counts"]["images"]


def test_cli_builds_a_subset(tmp_path, capsys):
    assert ec.main(["--out-dir", str(tmp_path / "cli"), "--image-size", "16", "--limit", "8", "--workers", "1",
                    "--vocab-size", "300"]) == 0
    printed = capsys.readouterr().out
    assert "test :" in printed and "new_drawings:" in printed and "rendered" in printed
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["config"]["image_size"] == 16 and manifest["config"]["limit"] == 8
    assert (tmp_path / "cli" / "tokenizer" / "tokenizer.json").is_file()
