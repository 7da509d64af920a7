"""Datasets over ALBEF's annotation formats, with an optional in-memory cache of decoded images.

- :class:`PretrainDataset`: ALBEF's pretraining lists (COCO + VG + SBU + CC3M, or ``data/emoji/pretrain.json``);
  a caption is drawn at random from the record's list at each visit.
- :class:`RetrievalTrainDataset`: retrieval fine-tuning records; ``image_id`` mapped to a contiguous
  int in order of first appearance (ALBEF's ``img_ids``), so positives share it.
- :class:`RetrievalEvalDataset`: one item per image; ``texts``, ``txt2img``, ``img2txt`` as ALBEF.

Each training item is a dict ``{"image": (3, S, S) float, "caption": str, "image_id": int, "index": int}``;
:class:`codis_lib.data.collate.ImageTextCollator` turns a list of them into the batch of docs/BATCH.md.
For the momentum teacher's own views (``ModelConfig.teacher_view`` / ``teacher_text_view``) the
training datasets built with ``teacher_image=True`` add ``"image_teacher"`` (a second, independent draw
of the same transform) and with ``teacher_caption=True`` ``"caption_teacher"`` (another caption of the
record, the same one when it has only one); with ``teacher_other_drawing=True`` too, the teacher's image is
another record's with the very same captions (on the emoji corpus: the emoji drawn by the other art family; one
at random if several, the record's own if none), under the same transform. All are drawn after the student's
inputs, so those stay the same whatever the teacher sees. The teacher image's flip (``flip_policy="skip"``) respects
the sides named by both captions it is paired with; the student's image still looks at its own caption
only. ``"swap"`` is refused with a teacher view, since the two views could disagree on left and right.
The datasets define ``__getitems__``, which PyTorch's DataLoader calls with the indices of a whole
batch: the transforms then run once per batch (``TrainTransform.batch``) instead of once per image.
The training datasets' ``load_items(indices, generators)`` does the same with one generator per
item, from which that item draws all its randomness: training (``SeededItems``) loads batches this
way and gets, bit for bit, the items it would get one at a time.
A custom ``transform`` may be a plain callable ``(image, caption) -> (tensor, caption)`` instead.

``style_variants=("grayscale", ...)`` (data.style_variants) also shows every record re-drawn in each
named style (`codis_lib.data.style_variants`): items 0 .. n-1 are the records' own drawings, then one
block per style of the records it may re-draw (a colour-changing style skips captions that name a
colour). A variant keeps its record's captions and ``image_id`` (the same image, so pretraining passes
the ids: variants of one image are positives, never hard negatives); its ``index`` is its own item's.
The styled images are drawn once when the images are cached, else at each load.

The cache (``cache=True``) decodes every distinct image once into uint8 tensors (for the emoji
corpus: 6380 images x 3 x 64 x 64 = 78 MB) so that an epoch costs transforms, not PNG decoding.
DataLoader workers started by fork share the cached tensor without copying it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import torch
from torch.utils.data import Dataset

from codis_lib.data.albef_json import (
    AnnotationError,
    read_pretrain_annotations,
    read_retrieval_eval,
    read_retrieval_train,
)
from codis_lib.data.decode import WHITE
from codis_lib.data.image_source import (  # noqa: F401  (decode_image, DecodedImageCache re-exported: they lived here)
    DEFAULT_CACHE_LIMIT_BYTES,
    DecodedImageCache,
    _ImageSource,
    _without_undecodable,
    decode_image,
)
from codis_lib.data.style_variants import VariantItems
from codis_lib.data.transforms import EvalTransform, build_transform

logger = logging.getLogger(__name__)

def _call_drawing_from(transform, image, caption: str, generator: torch.Generator | None) -> tuple:
    """Return ``transform(image, caption)`` run with torch's global generator in ``generator``'s state.

    A plain callable draws from the global generator; this gives it the item's own stream, which
    then moves on by what it drew (so a second call draws anew), and restores the caller's state.
    ``generator=None``: the global generator as it is.
    """
    if generator is None:
        return transform(image, caption)
    global_generator = torch.default_generator
    caller_state = global_generator.get_state()
    global_generator.set_state(generator.get_state())
    try:
        result = transform(image, caption)
        generator.set_state(global_generator.get_state())
        return result
    finally:
        global_generator.set_state(caller_state)


def _transform_batch(transform, images: list, captions: list[str], generators: list | None) -> tuple:
    """Return (images (B, 3, S, S), captions) through ``transform.batch``, or one by one for a plain callable."""
    if hasattr(transform, "batch"):
        return transform.batch(images, captions, generators)
    pairs = [_call_drawing_from(transform, image, caption, None if generators is None else generators[row])
             for row, (image, caption) in enumerate(zip(images, captions))]
    return torch.stack([image for image, _ in pairs]), [caption for _, caption in pairs]


def _contiguous_ids(values) -> tuple[list[int], dict]:
    """Return each value's contiguous id in order of first appearance, and the mapping."""
    mapping: dict = {}
    ids = []
    for value in values:
        if value not in mapping:
            mapping[value] = len(mapping)
        ids.append(mapping[value])
    return ids, mapping


class _ImageTextDataset(Dataset):
    """The two training datasets: (image, caption) items from an ALBEF annotation reader, transformed a batch at a time.

    Subclasses set the reader, the transform kind ("pretrain" or "train"), the default image size,
    which record field identifies an image, and the captions of a record (one is drawn per visit).
    """

    _transform_kind = ""
    _default_image_size = 0

    @staticmethod
    def _read(annotation_files, image_root, **options):
        raise NotImplementedError

    @staticmethod
    def _image_key(record):
        raise NotImplementedError

    def __init__(
        self,
        annotation_files: str | os.PathLike | Sequence[str | os.PathLike],
        image_root: str | os.PathLike | None = None,
        *,
        image_size: int | None = None,
        transform=None,
        augment: bool = True,
        flip_policy: str = "skip",
        augmentation: dict | None = None,
        max_words: int = 30,
        on_error: str = "raise",
        check_images: str = "verify",
        cache: bool = False,
        cache_max_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
        teacher_image: bool = False,
        teacher_caption: bool = False,
        teacher_other_drawing: bool = False,
        background: Sequence[int] = WHITE,
        outside_root: str = "warn",
        style_variants: Sequence[str] = (),
    ):
        """image_size: the output side (default 256 for pretraining, 384 for retrieval, as ALBEF).

        augmentation: build_transform's crop_scale / randaugment_ops / randaugment_magnitude (data config keys).
        teacher_image / teacher_caption: also return the teacher's own image view / another caption
        (see the module docstring); teacher_other_drawing: the teacher's image is another drawing of the
        record's captions (needs teacher_image). background: the (R, G, B) transparent pixels are composited on
        (white, the emoji corpus's). outside_root: see `read_pretrain_annotations`.
        on_error="skip" also drops a record whose image cannot be decoded: when the cache is built
        (counted in ``skipped["corrupt_image"]``), or, without a cache, when it is first loaded: the
        item is then made from the next loadable record (counted in ``skipped["corrupt_image_at_load"]``
        of the process that loaded it, with a warning line), so a truncated file never stops an epoch.
        style_variants: style names of `codis_lib.data.style_variants` (module docstring); ValueError for
        an unknown or repeated one.
        """
        result = self._read(annotation_files, image_root, max_words=max_words, on_error=on_error,
                            check_images=check_images, outside_root=outside_root)
        self.skipped = result.skipped
        self.on_error = on_error
        self.images = _ImageSource(result.records, cache, cache_max_bytes, background=background, on_error=on_error)
        self.records = _without_undecodable(result.records, self.images, self.skipped, ", ".join(result.files))
        if not self.records:
            raise ValueError(f"no usable records in {', '.join(result.files)} (skipped: {dict(result.skipped)})")
        self.unloadable: set[int] = set()  # records whose image failed to decode at load (on_error="skip")
        self.image_ids, self.image_id_of = _contiguous_ids(self._image_key(r) for r in self.records)
        self.variants = None  # item i is record i
        if style_variants:
            self.variants = VariantItems(style_variants, [self._captions(r) for r in range(len(self.records))])
            if self.images.cache is not None:
                self.variants.draw_all([r.image for r in self.records], self.images.load,
                                       cache_max_bytes - self.images.cache.nbytes)
        self.transform = transform if transform is not None else build_transform(
            self._transform_kind, image_size or self._default_image_size, augment=augment, flip_policy=flip_policy,
            **(augmentation or {}))
        self.teacher_image, self.teacher_caption = bool(teacher_image), bool(teacher_caption)
        if (teacher_image or teacher_caption) and getattr(self.transform, "flip_policy", None) == "swap":
            raise ValueError("flip_policy='swap' with a teacher view: the student's and the teacher's inputs could "
                             "disagree on left and right; use flip_policy 'skip' or 'ignore'")
        if teacher_other_drawing and not teacher_image:
            raise ValueError("teacher_other_drawing=True needs teacher_image=True (the teacher's image is the one "
                             "replaced by another drawing)")
        self.siblings = _other_drawings([tuple(self._captions(r)) for r in range(len(self.records))],
                                        [r.image for r in self.records]) if teacher_other_drawing else None
        if teacher_image and not teacher_other_drawing and getattr(self.transform, "augment", True) is False:
            raise ValueError("teacher_image=True with augment=False (data.augment): the teacher's image would be "
                             "the student's; teacher_view 'own' needs augmentation on")

    def __len__(self) -> int:
        return len(self.records) if self.variants is None else len(self.variants)

    def _captions(self, index: int) -> Sequence[str]:
        """Return the captions of record ``index``."""
        raise NotImplementedError

    def _draw_caption(self, index: int, generator: torch.Generator | None) -> int:
        """Return the position of the student's caption in the record's list (a draw only when it has several)."""
        count = len(self._captions(index))
        return 0 if count == 1 else int(torch.randint(count, (), generator=generator))

    def _draw_other_caption(self, index: int, first: int, generator: torch.Generator | None) -> int:
        """Return the position of the teacher's caption: uniform over the record's others (``first`` if none)."""
        count = len(self._captions(index))
        if count <= 2:
            return first if count == 1 else 1 - first
        other = int(torch.randint(count - 1, (), generator=generator))
        return other + (other >= first)

    def __getitem__(self, index: int) -> dict:
        return self.load_items([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Return the items of a whole batch, transformed together (DataLoader calls this when it exists)."""
        return self.load_items(indices)

    def load_items(self, indices: Sequence[int], generators: Sequence[torch.Generator] | None = None) -> list[dict]:
        """Return the items ``indices``, transformed together.

        ``generators``: None draws from torch's global generator; or one generator per index, from
        which item k draws all its randomness (its caption, then the transform's crop, flip and
        RandomAugment; then the teacher's caption and image when asked for): then item k is the one
        ``self[indices[k]]`` gives with the global generator in that generator's state, bit for bit,
        whatever else is in the batch.
        """
        if generators is not None and len(generators) != len(indices):
            raise ValueError(f"{len(generators)} generators for {len(indices)} indices")
        draw_from = list(generators) if generators is not None else [None] * len(indices)
        variants = self.variants
        # records[k]: the record item k is made of (its own, or the next loadable one with on_error="skip")
        images, records = self._load_images(indices if variants is None else [variants.record[i] for i in indices])
        if variants is not None:  # the style a substitute record does not allow: its own drawing
            styles = [variants.style[i] if variants.allows(variants.style[i], r) else None
                      for i, r in zip(indices, records)]
            images = [variants.styled(image, self.records[r].image, style)
                      for image, r, style in zip(images, records, styles)]
        picks = [self._draw_caption(r, generator) for r, generator in zip(records, draw_from)]
        captions = [self._captions(r)[pick] for r, pick in zip(records, picks)]
        batch, paired = _transform_batch(self.transform, images, captions, generators)
        items = [{"image": batch[row], "caption": paired[row], "image_id": self.image_ids[r], "index": i}
                 for row, (i, r) in enumerate(zip(indices, records))]
        flip_captions = captions  # what the teacher's image is paired with (its flip must respect their sides)
        if self.teacher_caption:
            others = [self._captions(r)[self._draw_other_caption(r, pick, generator)]
                      for r, pick, generator in zip(records, picks, draw_from)]
            flip_captions = [f"{mine} ; {other}" for mine, other in zip(captions, others)]
            for item, other in zip(items, others):
                item["caption_teacher"] = other
        if self.teacher_image:
            if self.siblings is not None:
                images = [self._other_drawing(r, image, generator)
                          for r, image, generator in zip(records, images, draw_from)]
            teacher_batch, _ = _transform_batch(self.transform, images, flip_captions, generators)
            for row, item in enumerate(items):
                item["image_teacher"] = teacher_batch[row]
        return items

    def _other_drawing(self, record: int, own: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Return the image of a record with ``record``'s captions and another image (drawn), or ``own`` if none."""
        others = [s for s in self.siblings[record] if s not in self.unloadable]
        if not others:
            return own
        pick = others[0] if len(others) == 1 else others[int(torch.randint(len(others), (), generator=generator))]
        image = self._load_or_skip(pick, "the teacher reads the record's own image instead of this other drawing")
        return own if image is None else image

    def _load_or_skip(self, record: int, instead: str) -> torch.Tensor | None:
        """Return record ``record``'s image, or with on_error="skip" None if it fails (remembered, counted, warned)."""
        if self.on_error != "skip":
            return self.images.load(self.records[record].image)
        try:
            return self.images.load(self.records[record].image)
        except (AnnotationError, OSError, ValueError, SyntaxError) as err:
            self.unloadable.add(record)
            self.skipped["corrupt_image_at_load"] += 1
            logger.warning("skipping a record whose image cannot be decoded (%s); %s (%d skipped at load in this "
                           "process so far)", err, instead, self.skipped["corrupt_image_at_load"])
            return None

    def _load_images(self, indices: Sequence[int]) -> tuple[list[torch.Tensor], list[int]]:
        """Return the decoded images of records ``indices`` and the record each one comes from.

        With on_error="raise" record k is indices[k] and a decoding failure raises AnnotationError. With
        "skip" a record whose image fails is remembered, counted and replaced by the next record (in
        file order, wrapping) whose image loads.
        """
        if self.on_error != "skip":
            return [self.images.load(self.records[i].image) for i in indices], list(indices)
        images, used = [], []
        for i in indices:
            for step in range(len(self.records)):
                candidate = (i + step) % len(self.records)
                if candidate in self.unloadable:
                    continue
                image = self._load_or_skip(candidate, "its items are made from the next record")
                if image is None:
                    continue
                images.append(image)
                used.append(candidate)
                break
            else:
                raise ValueError("on_error='skip': no record's image can be decoded")
        return images, used


class PretrainDataset(_ImageTextDataset):
    """ALBEF pretraining list(s): items {image, caption (drawn from the record's list), image_id, index}.

    image_id numbers the distinct image paths in order of first appearance.
    """

    _transform_kind = "pretrain"
    _default_image_size = 256
    _read = staticmethod(read_pretrain_annotations)

    @staticmethod
    def _image_key(record):
        return record.image

    def _captions(self, index: int) -> Sequence[str]:
        return self.records[index].captions


class RetrievalTrainDataset(_ImageTextDataset):
    """ALBEF retrieval training records: items {image, caption, image_id (contiguous), index}.

    image_id numbers the records' own image_id values in order of first appearance (image_id_of maps back).
    """

    _transform_kind = "train"
    _default_image_size = 384
    _read = staticmethod(read_retrieval_train)

    @staticmethod
    def _image_key(record):
        return record.image_id

    def _captions(self, index: int) -> Sequence[str]:
        return (self.records[index].caption,)


DUPLICATES_CHOICES = ("merge", "raise")


def merge_duplicate_images(records: list, duplicates: str = "merge") -> tuple[list, int]:
    """Return (records with one record per image path, how many duplicate records were merged).

    A test file that lists an image twice would make each copy a wrong candidate tied with the right
    one (R@1 falls to 0 under pessimistic ties). ``duplicates="merge"``: a later record of the same
    image adds its captions (those the first record lacks) to the first one, and one warning line
    gives the count; ``"raise"``: AnnotationError naming both records and the count.
    """
    if duplicates not in DUPLICATES_CHOICES:
        raise ValueError(f"duplicates={duplicates!r}: expected one of {DUPLICATES_CHOICES}")
    first: dict[str, int] = {}
    merged: list = []
    count, example = 0, None
    for record in records:
        if record.image not in first:
            first[record.image] = len(merged)
            merged.append(record)
            continue
        count += 1
        kept = merged[first[record.image]]
        example = example or (kept, record)
        extra = tuple(c for c in record.captions if c not in kept.captions)
        merged[first[record.image]] = dataclasses.replace(kept, captions=kept.captions + extra)
    if count:
        kept, again = example
        where = f"record {again.index} repeats record {kept.index}'s image {again.image}"
        if duplicates == "raise":
            raise AnnotationError(again.source, None, f"{count} duplicate image record(s) ({where}); each image "
                                  f"must appear once in a retrieval test file (or pass duplicates='merge')")
        logger.warning("%s: merged %d duplicate image record(s) into the first record of their image, captions "
                       "combined (first: %s); %d images remain", again.source, count, where, len(merged))
    return merged, count


class RetrievalEvalDataset(Dataset):
    """ALBEF retrieval test file: one item {image, index} per image; texts, txt2img, img2txt for the texts.

    An image listed by several records is evaluated once with all their captions (``duplicates="merge"``,
    counted in ``merged_duplicates`` and warned about) or refused (``"raise"``): see `merge_duplicate_images`.
    With ``on_error="skip"`` and the cache, a record whose image cannot be decoded is dropped and counted;
    without the cache an undecodable image raises when loaded (an evaluation never swaps images).
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        *,
        image_size: int = 384,
        transform=None,
        max_words: int = 30,
        on_error: str = "raise",
        check_images: str = "verify",
        cache: bool = False,
        cache_max_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
        duplicates: str = "merge",
        background: Sequence[int] = WHITE,
        outside_root: str = "warn",
    ):
        result = read_retrieval_eval(annotation_file, image_root, max_words=max_words, on_error=on_error,
                                     check_images=check_images, outside_root=outside_root)
        self.records, self.merged_duplicates = merge_duplicate_images(result.records, duplicates)
        self.skipped = result.skipped
        self._source = _ImageSource(self.records, cache, cache_max_bytes, background=background, on_error=on_error)
        self.records = _without_undecodable(self.records, self._source, self.skipped, str(annotation_file))
        if not self.records:
            raise ValueError(f"no usable records in {annotation_file} (skipped: {dict(result.skipped)})")
        self.transform = transform if transform is not None else EvalTransform(image_size)
        self.images: list[str] = [r.image for r in self.records]
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for image_index, record in enumerate(self.records):
            self.img2txt.append([])
            for caption in record.captions:
                self.img2txt[image_index].append(len(self.texts))
                self.txt2img.append(image_index)
                self.texts.append(caption)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Return the items of a whole batch, transformed together (DataLoader calls this when it exists)."""
        images = [self._source.load(self.records[i].image) for i in indices]
        if hasattr(self.transform, "batch"):
            batch = self.transform.batch(images)
        else:
            batch = torch.stack([self.transform(img) for img in images])
        return [{"image": batch[row], "index": i} for row, i in enumerate(indices)]


def _other_drawings(caption_lists: Sequence[tuple], images: Sequence[str]) -> list[list[int]]:
    """Return, per record, the other records with the same caption list and another image path (file order)."""
    groups: dict[tuple, list[int]] = {}
    for record, captions in enumerate(caption_lists):
        groups.setdefault(captions, []).append(record)
    return [[other for other in groups[captions] if images[other] != images[record]]
            for record, captions in enumerate(caption_lists)]
