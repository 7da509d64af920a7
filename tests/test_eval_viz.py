"""The plotting helpers of notebooks 05-06: image conversion, word counts, and figures with the right panels."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from codis_lib.data.transforms import CLIP_MEAN, CLIP_STD, normalize
from codis_lib.viz import (distinctive_words, plot_code_gallery, plot_code_usage, plot_embedding_map, plot_image_to_texts,
                           plot_text_to_images, save_figure, to_display_image, top_words)


def test_to_display_image_undoes_the_clip_normalisation():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    shown = to_display_image(normalize(image), CLIP_MEAN, CLIP_STD)
    assert shown.shape == (8, 8, 3)
    np.testing.assert_allclose(shown, image.permute(1, 2, 0).numpy() / 255.0, atol=1e-5)
    assert to_display_image(image.permute(1, 2, 0).numpy()).max() <= 1.0  # uint8 HWC -> [0, 1]


def test_top_words_counts_and_drops_stopwords():
    captions = ["a red heart", "red heart suit", "the heart", "a red apple"]
    assert top_words(captions, 2, stopwords=frozenset({"a", "the"})) == [("heart", 3), ("red", 3)]


def test_distinctive_words_prefer_words_specific_to_the_group():
    everything = ["a red heart emoji", "a blue heart emoji", "red apple emoji", "green apple emoji", "car emoji"]
    group = ["a red heart emoji", "red apple emoji"]
    words = distinctive_words(group, everything, 3)
    assert words[0] == ("red", 2)  # in 2 of 5 captions, both in the group
    assert "emoji" not in [w for w, _ in words[:2]]  # in every caption: idf log(5/5) = 0
    assert dict(words).get("emoji", 0) in (0, 2)


@pytest.mark.parametrize("rows", [1, 3])
def test_figures_have_one_row_per_query_and_save_as_png(tmp_path, rows):
    image = np.ones((8, 8, 3))
    fig = plot_text_to_images([f"caption {i}" for i in range(rows)], [[image] * 5] * rows,
                              [[True, False, False, False, False]] * rows)
    assert len(fig.axes) == rows * 6  # caption cell + 5 images per row
    path = save_figure(fig, tmp_path / "figs", "t2i")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_image_to_texts([image] * rows, [["a", "b"]] * rows, [[False, True]] * rows)
    assert len(fig.axes) == rows * 2
    fig = plot_code_gallery(list(range(rows)), [[image] * 4] * rows, [[("heart", 3)]] * rows, sizes=[4] * rows)
    assert len(fig.axes) == rows * 5


def test_embedding_map_and_usage_plot_draw_every_point():
    points = np.random.default_rng(0).standard_normal((7, 2))
    fig = plot_embedding_map(points, ["image"] * 3 + ["text"] * 2 + ["code"] * 2, code_labels=[5, 9])
    drawn = sum(len(collection.get_offsets()) for collection in fig.axes[0].collections)
    assert drawn == 7
    fig = plot_code_usage(np.array([3, 0, 5]), np.array([1, 1, 4]))
    heights = [patch.get_height() for patch in fig.axes[0].patches]
    assert heights == [5, 3, 0, 4, 1, 1]  # images then captions, codes sorted by image count
