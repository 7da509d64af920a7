"""Decoded images by path for the datasets: exact decoding, an optional in-memory cache, and skipping bad files.

- :func:`decode_image`: one file as a (3, H, W) uint8 RGB tensor, every PIL mode converted exactly
  (`codis_lib.data.decode`), transparency composited on the corpus background (white by default).
- :class:`DecodedImageCache`: every distinct image decoded once (the emoji corpus: 78 MB).
- ``_ImageSource``: what a dataset loads its images through (cache or file), naming the annotation
  record on failure; with ``on_error="skip"`` the images the cache cannot decode are listed, and
  ``_without_undecodable`` drops their records and counts them.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from codis_lib.data.albef_json import AnnotationError
from codis_lib.data.decode import WHITE, open_image
from codis_lib.data.transforms import to_uint8_tensor

logger = logging.getLogger("codis_lib.data.datasets")  # the datasets' log lines keep their logger name

DEFAULT_CACHE_LIMIT_BYTES = 4 << 30


def decode_image(path: str, background: Sequence[int] = WHITE) -> torch.Tensor:
    """Return the image file at ``path`` as a (3, H, W) uint8 RGB tensor.

    Every PIL mode is converted exactly (`codis_lib.data.decode`): 16-bit grey scaled to 8 bits,
    transparency composited on ``background`` (white, the emoji corpus's background, by default).
    """
    with open_image(path) as img:  # Pillow's bomb limit: a one-line ImageTooLargeError (a ValueError)
        img.load()
        return to_uint8_tensor(img, background)


class DecodedImageCache:
    """Every distinct image decoded once to uint8; ``cache[path]`` returns its (3, H, W) tensor.

    Images of one common size are stored in a single (N, 3, H, W) tensor (one allocation, shared
    by forked workers); mixed sizes are kept as a list. ``max_bytes`` guards against caching a
    corpus that does not fit: the error says how much it would take. ``on_error="skip"`` leaves an
    image that cannot be decoded (a truncated file) out of the cache and records it in ``failed``
    {path: problem} instead of raising.
    """

    def __init__(self, paths: Sequence[str], *, max_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
                 where: dict[str, tuple[str, int]] | None = None, background: Sequence[int] = WHITE,
                 on_error: str = "raise"):
        unique = list(dict.fromkeys(paths))
        self.failed: dict[str, str] = {}
        images, total, kept = [], 0, []
        for path in unique:
            try:
                image = decode_image(path, background)
            except (OSError, ValueError, SyntaxError) as err:
                if on_error == "skip":
                    self.failed[path] = f"cannot decode image {path}: {err}"
                    continue
                source, index = (where or {}).get(path, (None, None))
                if source is not None:
                    raise AnnotationError(source, index, f"cannot decode image {path}: {err}") from err
                raise OSError(f"cannot decode image {path}: {err}") from err
            kept.append(path)
            total += image.numel()
            if total > max_bytes:
                raise MemoryError(
                    f"decoded-image cache would exceed max_bytes={max_bytes} after {len(images) + 1} of "
                    f"{len(unique)} images ({total} bytes so far); use cache=False for this corpus, or raise the limit"
                )
            images.append(image)
        self.row_of = {path: row for row, path in enumerate(kept)}
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
    """Loads images by path, from the cache when there is one, naming the annotation record on failure.

    ``failed``: {path: problem} of the images the cache could not decode (``on_error="skip"`` only).
    """

    def __init__(self, records, cache: bool, cache_max_bytes: int, *, background: Sequence[int] = WHITE,
                 on_error: str = "raise"):
        self.where = {r.image: (r.source, r.index) for r in reversed(records)}  # first record naming each image
        self.background = tuple(background)
        self.cache = DecodedImageCache([r.image for r in records], max_bytes=cache_max_bytes, where=self.where,
                                       background=background, on_error=on_error) if cache else None
        self.failed = dict(self.cache.failed) if self.cache is not None else {}

    def load(self, path: str) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[path]
        try:
            return decode_image(path, self.background)
        except (OSError, ValueError, SyntaxError) as err:
            source, index = self.where.get(path, (None, None))
            if source is None:
                raise
            raise AnnotationError(source, index, f"cannot decode image {path}: {err}") from err


def _without_undecodable(records: list, images: _ImageSource, skipped, kind: str) -> list:
    """Return ``records`` without those whose image the cache could not decode, counting them in ``skipped``.

    Each dropped record counts once under "corrupt_image"; one warning line names the first.
    """
    if not images.failed:
        return records
    kept = [r for r in records if r.image not in images.failed]
    dropped = len(records) - len(kept)
    skipped["corrupt_image"] += dropped
    first = next(r for r in records if r.image in images.failed)
    logger.warning("%s: skipped %d record(s) whose image could not be decoded when caching (first: %s record %d: %s)",
                   kind, dropped, first.source, first.index, images.failed[first.image])
    return kept
