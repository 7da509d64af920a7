"""Datasets, the decoded-image cache, and the collator, on the small emoji corpus and the COCO-format fixtures."""
import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

from codis_lib.data.albef_json import AnnotationError
from codis_lib.data.collate import ImageTextCollator, collate_eval_images
from codis_lib.data.datasets import (
    DecodedImageCache,
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    decode_image,
)
from codis_lib.data.tokenizer import load_tokenizer
from codis_lib.train.sampler import GlobalBatchSampler, SeededItems
from tests.fixtures_data.corpus import FIXTURES, SMALL_CORPUS_SIZE, small_emoji_corpus, write_coco_style_images


@pytest.fixture(scope="module")
def corpus():
    out, manifest = small_emoji_corpus()
    return out, manifest, load_tokenizer(out / "tokenizer")


def test_pretrain_items_and_cache_equals_decoding(corpus):
    out, manifest, _ = corpus
    plain = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, augment=False)
    cached = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, augment=False, cache=True)
    assert len(plain) == len(cached) == manifest["counts"]["pretrain_records"]
    for index in (0, len(plain) // 2, len(plain) - 1):
        a, b = plain[index], cached[index]
        assert set(a) == {"image", "caption", "image_id", "index"} and a["index"] == index
        assert a["image"].shape == (3, SMALL_CORPUS_SIZE, SMALL_CORPUS_SIZE) and a["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"])  # the cache changes speed, not pixels
        assert a["caption"] in plain.records[index].captions
    cache = cached.images.cache
    assert len(cache) == len(cached) and cache.nbytes == len(cache) * 3 * SMALL_CORPUS_SIZE ** 2
    assert isinstance(cache.images, torch.Tensor) and cache.images.dtype == torch.uint8  # one (N, 3, H, W) block


def test_pretrain_draws_captions_from_the_list(corpus):
    out, _, _ = corpus
    dataset = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, cache=True, augment=False)
    torch.manual_seed(0)
    drawn = {dataset[0]["caption"] for _ in range(60)}
    assert drawn == set(dataset.records[0].captions) and len(drawn) > 1


def test_retrieval_train_image_ids_are_shared_by_both_drawings(corpus):
    out, manifest, _ = corpus
    dataset = RetrievalTrainDataset(out / "train.json", image_size=SMALL_CORPUS_SIZE, augment=False)
    raw = json.loads((out / "train.json").read_text())
    assert len(dataset) == len(raw)
    by_emoji = {}
    for record, contiguous in zip(raw, dataset.image_ids):
        by_emoji.setdefault(record["image_id"], set()).add(contiguous)
    assert all(len(ids) == 1 for ids in by_emoji.values())  # one int per emoji
    assert sorted({next(iter(i)) for i in by_emoji.values()}) == list(range(len(by_emoji)))  # contiguous from 0
    held_out = {row["key"] for row in manifest["emoji"] if row["held_out_style"]}  # one drawing in new_drawings
    first = next(r["image_id"] for r in raw if r["image_id"] not in held_out)
    styles = {r["image"].split("/")[1] for r in raw if r["image_id"] == first}
    assert styles == {"twemoji", "openmoji"}
    assert dataset[3]["image_id"] == dataset.image_ids[3]


def test_retrieval_eval_index_maps(corpus):
    out, manifest, _ = corpus
    dataset = RetrievalEvalDataset(out / "test.json", image_size=SMALL_CORPUS_SIZE, cache=True)
    raw = json.loads((out / "test.json").read_text())
    assert len(dataset) == len(raw) == manifest["counts"]["splits"]["test"]["images"]
    assert len(dataset.texts) == len(dataset.txt2img) == sum(len(r["caption"]) for r in raw)
    for image_index, text_indices in enumerate(dataset.img2txt):
        assert text_indices and all(dataset.txt2img[t] == image_index for t in text_indices)
    assert sorted(t for ts in dataset.img2txt for t in ts) == list(range(len(dataset.texts)))
    item = dataset[1]
    assert item["index"] == 1 and item["image"].shape == (3, SMALL_CORPUS_SIZE, SMALL_CORPUS_SIZE)
    batch = collate_eval_images([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, SMALL_CORPUS_SIZE, SMALL_CORPUS_SIZE) and batch["index"].tolist() == [0, 1]


def test_collator_builds_the_common_batch(corpus):
    out, _, tokenizer = corpus
    dataset = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, cache=True)
    batch = ImageTextCollator(tokenizer, max_length=25)([dataset[i] for i in range(5)])
    assert set(batch) == {"image", "input_ids", "attention_mask", "image_ids", "index", "captions"}
    assert batch["image"].shape == (5, 3, SMALL_CORPUS_SIZE, SMALL_CORPUS_SIZE)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == batch["image_ids"].dtype == batch["index"].dtype == torch.int64
    assert ids.shape == mask.shape and ids.shape[1] <= 25
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and not (ids == tokenizer.sep_token_id).any()
    assert (ids[mask == 0] == 0).all()
    assert batch["index"].tolist() == [0, 1, 2, 3, 4] and len(batch["captions"]) == 5
    for row, caption in enumerate(batch["captions"]):
        assert int(mask[row].sum()) == min(25, 1 + len(tokenizer.tokenize(caption)))


def test_loader_with_two_workers(corpus):
    out, _, tokenizer = corpus
    dataset = RetrievalTrainDataset(out / "train.json", image_size=SMALL_CORPUS_SIZE, cache=True)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2, collate_fn=ImageTextCollator(tokenizer),
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch, _ in zip(loader, range(3)):
        assert batch["image"].shape == (8, 3, SMALL_CORPUS_SIZE, SMALL_CORPUS_SIZE)
        assert torch.isfinite(batch["image"]).all()
        seen += batch["index"].tolist()
    assert len(set(seen)) == 24


def test_coco_format_fixtures_through_the_datasets(tmp_path):
    root = write_coco_style_images(tmp_path / "coco")
    train = RetrievalTrainDataset(FIXTURES / "coco_karpathy_train.json", root, image_size=24)
    assert train.image_ids == [0, 0, 1, 2] and train.image_id_of == {"coco_1": 0, "coco_2": 1, "coco_3": 2}
    assert train[2]["image"].shape == (3, 24, 24)
    test = RetrievalEvalDataset(FIXTURES / "coco_karpathy_test.json", root, image_size=24)
    assert test.txt2img == [0] * 5 + [1] * 5 and test.img2txt == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    pretrain = PretrainDataset(FIXTURES / "pretrain_list.json", root, image_size=24, cache=True)
    assert pretrain.image_ids == [0, 1, 2] and len(pretrain.images.cache) == 3
    # ALBEF's default sizes when none is given: 256 for pretraining, 384 for retrieval
    assert PretrainDataset(FIXTURES / "pretrain_list.json", root, augment=False)[0]["image"].shape == (3, 256, 256)
    assert RetrievalTrainDataset(FIXTURES / "coco_karpathy_train.json", root, augment=False)[0]["image"].shape \
        == (3, 384, 384)


def test_undecodable_image_names_annotation_file_and_record(corpus, tmp_path):
    out, _, _ = corpus
    records = json.loads((out / "pretrain.json").read_text())[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    records[1] = {"image": str(broken), "caption": "x"}
    for record in records:
        if not record["image"].startswith("/"):
            record["image"] = str(out / record["image"])
    path = tmp_path / "list.json"
    path.write_text(json.dumps(records))
    where = re.escape(f"{path}: record 1: ")
    with pytest.raises(AnnotationError, match=where + "cannot decode"):
        PretrainDataset(path, image_size=16, check_images="none", cache=True)  # the cache decodes up front
    lazy = PretrainDataset(path, image_size=16, check_images="none")
    lazy[0]
    with pytest.raises(AnnotationError, match=where + "cannot decode"):
        lazy[1]
    skipping = PretrainDataset(path, image_size=16, on_error="skip", cache=True)  # verify catches it at read time
    assert len(skipping) == 2 and dict(skipping.skipped) == {"corrupt_image": 1}


def test_cache_size_limit_is_explicit(corpus):
    out, _, _ = corpus
    paths = [str(out / r["image"]) for r in json.loads((out / "pretrain.json").read_text())]
    with pytest.raises(MemoryError, match="max_bytes=10000"):
        DecodedImageCache(paths, max_bytes=10_000)
    assert torch.equal(DecodedImageCache(paths[:2])[paths[1]], decode_image(paths[1]))


def test_getitems_is_the_batched_getitem(corpus):
    out, _, _ = corpus
    for dataset in (PretrainDataset(out / "pretrain.json", image_size=24, augment=False, cache=True),
                    RetrievalTrainDataset(out / "train.json", image_size=24, augment=False),
                    RetrievalEvalDataset(out / "val.json", image_size=24)):
        indices = [2, 0, len(dataset) - 1]
        together = dataset.__getitems__(indices)
        for index, item in zip(indices, together):
            single = dataset[index]
            assert torch.equal(item["image"], single["image"]) and item["index"] == index
            if "image_id" in item:
                assert item["image_id"] == single["image_id"]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_loader_batches_equal_item_by_item_loading(corpus, workers):
    """Training loads seeded batches at once; each sample is still the one (seed, epoch, index) gives alone."""
    out, _, tokenizer = corpus
    collate = ImageTextCollator(tokenizer, max_length=25)
    for dataset in (PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, flip_policy="swap",
                                    cache=True),
                    RetrievalTrainDataset(out / "train.json", image_size=SMALL_CORPUS_SIZE)):
        seeded = SeededItems(dataset, seed=5)
        sampler = GlobalBatchSampler(seeded, batch_size=6, seed=5)
        sampler.set_epoch(1)
        seeded.set_epoch(1)
        loader = DataLoader(seeded, batch_size=6, sampler=sampler, drop_last=True, collate_fn=collate,
                            num_workers=workers)
        order = list(sampler)
        one_at_a_time = [seeded[index] for index in order]  # item by item, each under its own global seed
        batches = list(loader)
        assert len(batches) == len(order) // 6 and len(batches) > 2
        for number, batch in enumerate(batches):
            expected = collate(one_at_a_time[number * 6:(number + 1) * 6])
            for key in ("image", "input_ids", "attention_mask", "image_ids", "index"):
                assert torch.equal(batch[key], expected[key]), key
            assert batch["captions"] == expected["captions"]
        regrouped = seeded.__getitems__(order[9:2:-1])  # another batch composition and order, another size
        for item, index in zip(regrouped, order[9:2:-1]):
            single = one_at_a_time[order.index(index)]
            assert torch.equal(item["image"], single["image"]) and item["caption"] == single["caption"]
        seeded.set_epoch(2)
        assert not torch.equal(seeded.__getitems__(order[:1])[0]["image"], one_at_a_time[0]["image"])


def _distinct_captions(dataset, index):
    captions = dataset.records[index].captions
    return len(captions) > 1 and len(set(captions)) == len(captions)


@pytest.mark.parametrize("workers", [0, 2])
def test_teacher_views_are_second_draws_of_the_same_seeded_stream(corpus, workers):
    """The teacher's image and caption depend on (seed, epoch, index) alone and leave the student's inputs alone."""
    out, _, tokenizer = corpus
    collate = ImageTextCollator(tokenizer, max_length=25)
    plain = SeededItems(PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, cache=True), seed=5)
    dataset = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, cache=True, teacher_image=True,
                              teacher_caption=True)
    seeded = SeededItems(dataset, seed=5)
    sampler = GlobalBatchSampler(seeded, batch_size=6, seed=5)
    for stream in (plain, seeded):
        stream.set_epoch(1)
    sampler.set_epoch(1)
    order = list(sampler)
    one_at_a_time = [seeded[index] for index in order]
    loader = DataLoader(seeded, batch_size=6, sampler=sampler, drop_last=True, collate_fn=collate, num_workers=workers)
    for number, batch in enumerate(loader):
        expected = collate(one_at_a_time[number * 6:(number + 1) * 6])
        assert set(batch) == set(expected) >= {"image_teacher", "teacher_input_ids", "teacher_attention_mask"}
        for key in ("image", "image_teacher", "input_ids", "teacher_input_ids", "teacher_attention_mask"):
            assert torch.equal(batch[key], expected[key]), key
        assert batch["teacher_captions"] == expected["teacher_captions"]
    regrouped = seeded.__getitems__(order[9:2:-1])  # another batch composition, order and size
    students = plain.__getitems__(order[:12])  # the same samples without teacher views
    for item in regrouped:
        single = one_at_a_time[order.index(item["index"])]
        assert torch.equal(item["image_teacher"], single["image_teacher"])
        assert item["caption_teacher"] == single["caption_teacher"]
    for item, student in zip(one_at_a_time, students):
        assert torch.equal(item["image"], student["image"]) and item["caption"] == student["caption"]
        assert not torch.equal(item["image_teacher"], item["image"])  # an independent augmentation
        assert item["caption_teacher"] in dataset.records[item["index"]].captions
        if _distinct_captions(dataset, item["index"]):
            assert item["caption_teacher"] != item["caption"]


def test_other_caption_is_uniform_over_the_others_and_the_same_when_alone(corpus):
    out, _, tokenizer = corpus
    dataset = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, augment=False, cache=True,
                              teacher_caption=True)
    index = next(i for i in range(len(dataset)) if len(dataset.records[i].captions) >= 3
                 and _distinct_captions(dataset, i))
    captions = dataset.records[index].captions
    generator = torch.Generator().manual_seed(0)
    for first in range(len(captions)):
        drawn = {dataset._draw_other_caption(index, first, generator) for _ in range(80)}
        assert drawn == set(range(len(captions))) - {first}
    assert dataset._draw_other_caption(index, 0, None) != 0
    retrieval = RetrievalTrainDataset(out / "train.json", image_size=SMALL_CORPUS_SIZE, augment=False,
                                      teacher_caption=True)  # one caption per record: the teacher reads it too
    items = retrieval.__getitems__([0, 3])
    assert [item["caption_teacher"] for item in items] == [item["caption"] for item in items]
    batch = ImageTextCollator(tokenizer)(items)
    assert torch.equal(batch["teacher_input_ids"], batch["input_ids"]) and "image_teacher" not in batch


def test_teacher_image_view_of_a_plain_callable_transform_is_a_second_draw(corpus):
    out, _, _ = corpus

    def noisy(image, caption):  # draws from torch's global generator
        return image.float() + torch.rand(()), caption

    dataset = PretrainDataset(out / "pretrain.json", transform=noisy, cache=True, teacher_image=True)
    items = SeededItems(dataset, seed=1).__getitems__([0, 1])
    for item in items:
        assert not torch.equal(item["image"], item["image_teacher"])
    assert torch.equal(SeededItems(dataset, seed=1)[1]["image_teacher"], items[1]["image_teacher"])


def test_other_drawing_gives_the_teacher_the_image_with_the_same_captions(corpus):
    """teacher_other_drawing: the teacher's image is another record's with the very same captions, else its own."""
    out, _, _ = corpus
    raw = json.loads((out / "pretrain.json").read_text())
    dataset = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, augment=False, cache=True,
                              teacher_image=True, teacher_other_drawing=True)
    plain = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, augment=False, cache=True)
    twins = [i for i, others in enumerate(dataset.siblings) if others]
    alone = [i for i, others in enumerate(dataset.siblings) if not others]
    assert twins and alone  # the small corpus has emoji drawn by both families and emoji held out of one
    for index in range(len(raw)):
        expected = [j for j in range(len(raw)) if raw[j]["caption"] == raw[index]["caption"]
                    and raw[j]["image"] != raw[index]["image"]]
        assert dataset.siblings[index] == expected
    items = dataset.__getitems__(twins[:3] + alone[:2])
    for item in items:
        own = plain[item["index"]]["image"]
        assert torch.equal(item["image"], own)  # the student's input is unchanged
        others = dataset.siblings[item["index"]]
        if others:
            assert torch.equal(item["image_teacher"], plain[others[0]]["image"])
            assert raw[others[0]]["image"].split("/")[-1] == raw[item["index"]]["image"].split("/")[-1]
        else:
            assert torch.equal(item["image_teacher"], own)
    with pytest.raises(ValueError, match="teacher_other_drawing=True needs teacher_image=True"):
        PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, augment=False,
                        teacher_other_drawing=True)


def test_teacher_views_refuse_swapping_flips_no_augmentation_and_ragged_batches(corpus):
    out, _, _ = corpus
    with pytest.raises(ValueError, match="flip_policy='swap' with a teacher view"):
        PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, flip_policy="swap", teacher_image=True)
    with pytest.raises(ValueError, match=r"teacher_image=True with augment=False \(data.augment\)"):
        PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, augment=False, teacher_image=True)
    with pytest.raises(KeyError, match="caption_teacher"):
        items = PretrainDataset(out / "pretrain.json", image_size=SMALL_CORPUS_SIZE, augment=False, cache=True,
                                teacher_caption=True).__getitems__([0, 1])
        del items[1]["caption_teacher"]
        ImageTextCollator(load_tokenizer(out / "tokenizer"))(items)
