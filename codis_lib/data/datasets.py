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
record, the same one when it has only one). Both are drawn after the student's inputs, so those
stay the same whatever the teacher sees. The teacher image's flip (``flip_policy="skip"``) respects
the sides named by both captions it is paired with; the student's image still looks at its own caption
only. ``"swap"`` is refused with a teacher view, since the two views could disagree on left and right.
The datasets define ``__getitems__``, which PyTorch's DataLoader calls with the indices of a whole
batch: the transforms then run once per batch (``TrainTransform.batch``) instead of once per image.
The training datasets' ``load_items(indices, generators)`` does the same with one generator per
item, from which that item draws all its randomness: training (``SeededItems``) loads batches this
way and gets, bit for bit, the items it would get one at a time.
A custom ``transform`` may be a plain callable ``(image, caption) -> (tensor, caption)`` instead.

The cache (``cache=True``) decodes every distinct image once into uint8 tensors (for the emoji
corpus: 6380 images x 3 x 64 x 64 = 78 MB) so that an epoch costs transforms, not PNG decoding.
DataLoader workers started by fork share the cached tensor without copying it.
"""
from __future__ import annotations

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
from codis_lib.data.transforms import EvalTransform, build_transform, to_uint8_tensor

logger = logging.getLogger(__name__)

DEFAULT_CACHE_LIMIT_BYTES = 4 << 30


def decode_image(path: str) -> torch.Tensor:
    """Return the image file at ``path`` as a (3, H, W) uint8 RGB tensor."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return to_uint8_tensor(img)


class DecodedImageCache:
    """Every distinct image decoded once to uint8; ``cache[path]`` returns its (3, H, W) tensor.

    Images of one common size are stored in a single (N, 3, H, W) tensor (one allocation, shared
    by forked workers); mixed sizes are kept as a list. ``max_bytes`` guards against caching a
    corpus that does not fit: the error says how much it would take.
    """

    def __init__(self, paths: Sequence[str], *, max_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
                 where: dict[str, tuple[str, int]] | None = None):
        unique = list(dict.fromkeys(paths))
        self.row_of = {path: row for row, path in enumerate(unique)}
        images, total = [], 0
        for path in unique:
            try:
                image = decode_image(path)
            except (OSError, ValueError, SyntaxError) as err:
                source, index = (where or {}).get(path, (None, None))
                if source is not None:
                    raise AnnotationError(source, index, f"cannot decode image {path}: {err}") from err
                raise OSError(f"cannot decode image {path}: {err}") from err
            total += image.numel()
            if total > max_bytes:
                raise MemoryError(
                    f"decoded-image cache would exceed max_bytes={max_bytes} after {len(images) + 1} of "
                    f"{len(unique)} images ({total} bytes so far); use cache=False for this corpus, or raise the limit"
                )
            images.append(image)
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) == 1:
            self.images = torch.stack(images)  # (N, 3, H, W) uint8
        else:
            self.images = images
        self.nbytes = total

    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, path: str) -> bool:
        return path in self.row_of

    def __getitem__(self, path: str) -> torch.Tensor:
        return self.images[self.row_of[path]]


class _ImageSource:
    """Loads images by path, from the cache when there is one, naming the annotation record on failure."""

    def __init__(self, records, cache: bool, cache_max_bytes: int):
        self.where = {r.image: (r.source, r.index) for r in reversed(records)}  # first record naming each image
        self.cache = DecodedImageCache([r.image for r in records], max_bytes=cache_max_bytes,
                                       where=self.where) if cache else None

    def load(self, path: str) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[path]
        try:
            return decode_image(path)
        except (OSError, ValueError, SyntaxError) as err:
            source, index = self.where.get(path, (None, None))
            if source is None:
                raise
            raise AnnotationError(source, index, f"cannot decode image {path}: {err}") from err


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
    ):
        """image_size: the output side (default 256 for pretraining, 384 for retrieval, as ALBEF).

        augmentation: build_transform's crop_scale / randaugment_ops / randaugment_magnitude (data config keys).
        teacher_image / teacher_caption: also return the teacher's own image view / another caption
        (see the module docstring).
        """
        result = self._read(annotation_files, image_root, max_words=max_words, on_error=on_error,
                            check_images=check_images)
        if not result.records:
            raise ValueError(f"no usable records in {', '.join(result.files)} (skipped: {dict(result.skipped)})")
        self.records = result.records
        self.skipped = result.skipped
        self.image_ids, self.image_id_of = _contiguous_ids(self._image_key(r) for r in self.records)
        self.transform = transform if transform is not None else build_transform(
            self._transform_kind, image_size or self._default_image_size, augment=augment, flip_policy=flip_policy,
            **(augmentation or {}))
        self.images = _ImageSource(self.records, cache, cache_max_bytes)
        self.teacher_image, self.teacher_caption = bool(teacher_image), bool(teacher_caption)
        if (teacher_image or teacher_caption) and getattr(self.transform, "flip_policy", None) == "swap":
            raise ValueError("flip_policy='swap' with a teacher view: the student's and the teacher's inputs could "
                             "disagree on left and right; use flip_policy 'skip' or 'ignore'")
        if teacher_image and getattr(self.transform, "augment", True) is False:
            raise ValueError("teacher_image=True with augment=False (data.augment): the teacher's image would be "
                             "the student's; teacher_view 'own' needs augmentation on")

    def __len__(self) -> int:
        return len(self.records)

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
        images = [self.images.load(self.records[i].image) for i in indices]
        picks = [self._draw_caption(i, generator) for i, generator in zip(indices, draw_from)]
        captions = [self._captions(i)[pick] for i, pick in zip(indices, picks)]
        batch, paired = _transform_batch(self.transform, images, captions, generators)
        items = [{"image": batch[row], "caption": paired[row], "image_id": self.image_ids[i], "index": i}
                 for row, i in enumerate(indices)]
        flip_captions = captions  # what the teacher's image is paired with (its flip must respect their sides)
        if self.teacher_caption:
            others = [self._captions(i)[self._draw_other_caption(i, pick, generator)]
                      for i, pick, generator in zip(indices, picks, draw_from)]
            flip_captions = [f"{mine} ; {other}" for mine, other in zip(captions, others)]
            for item, other in zip(items, others):
                item["caption_teacher"] = other
        if self.teacher_image:
            teacher_batch, _ = _transform_batch(self.transform, images, flip_captions, generators)
            for row, item in enumerate(items):
                item["image_teacher"] = teacher_batch[row]
        return items


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


class RetrievalEvalDataset(Dataset):
    """ALBEF retrieval test file: one item {image, index} per image; texts, txt2img, img2txt for the texts."""

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
    ):
        result = read_retrieval_eval(annotation_file, image_root, max_words=max_words, on_error=on_error,
                                     check_images=check_images)
        if not result.records:
            raise ValueError(f"no usable records in {annotation_file} (skipped: {dict(result.skipped)})")
        self.records = result.records
        self.skipped = result.skipped
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
        self._source = _ImageSource(self.records, cache, cache_max_bytes)

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
