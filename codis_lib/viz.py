"""Every figure of the package: loss curves (notebook 04), retrieval galleries, Grad-CAM, UMAP, code galleries, usage.

Every function takes plain data (records of a metrics.jsonl file, or its path; images as (H, W, 3)
floats in [0, 1] or uint8), draws one matplotlib figure and returns it; `save_figure` writes it as PNG.
Nothing here computes a metric or trains, so the notebooks' numbers never depend on plotting code.
"""
from __future__ import annotations

import math
import os
import textwrap
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from codis_lib.data.emoji_captions import CAPTION_STOPWORDS
from codis_lib.metrics_log import LOSS_PREFIX, loss_terms, read_jsonl

CORRECT_COLOUR = "#2ca02c"
WRONG_COLOUR = "#d62728"
KIND_COLOURS = {"image": "#1f77b4", "text": "#ff7f0e", "code": "#000000"}


def _pyplot():
    """Return matplotlib.pyplot (matplotlib itself falls back to the Agg backend without a display)."""
    import matplotlib.pyplot as plt

    return plt


def to_display_image(image, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """Return an (H, W, 3) float array in [0, 1] from a (3, H, W) tensor (optionally un-normalised) or an (H, W, 3) array."""
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    array = array.astype(np.float64)
    if mean is not None and std is not None:
        array = array * np.asarray(std) + np.asarray(mean)
    elif array.max() > 1.0:
        array = array / 255.0
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array, 0.0, 1.0)


def _frame(ax, colour: str | None, width: float = 4.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(width)


def plot_text_to_images(query_captions: Sequence[str], retrieved_images: Sequence[Sequence[np.ndarray]],
                        is_correct: Sequence[Sequence[bool]], scores: Sequence[Sequence[float]] | None = None,
                        title: str = "Image retrieval: caption -> top images"):
    """Return a figure with one row per caption query: the caption, then its top images framed green (correct) or red."""
    plt = _pyplot()
    rows, cols = len(query_captions), max(len(r) for r in retrieved_images)
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.6 * (cols + 1) + 1.5, 1.7 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1] * cols})
    for row, caption in enumerate(query_captions):
        axes[row, 0].axis("off")
        axes[row, 0].text(0.0, 0.5, "\n".join(textwrap.wrap(caption, 26)), va="center", ha="left", fontsize=9)
        for col in range(cols):
            ax = axes[row, col + 1]
            if col >= len(retrieved_images[row]):
                ax.axis("off")
                continue
            ax.imshow(to_display_image(retrieved_images[row][col]))
            _frame(ax, CORRECT_COLOUR if is_correct[row][col] else WRONG_COLOUR)
            if scores is not None:
                ax.set_title(f"#{col + 1}  {scores[row][col]:.2f}", fontsize=8)
            elif row == 0:
                ax.set_title(f"#{col + 1}", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_image_to_texts(query_images: Sequence[np.ndarray], retrieved_captions: Sequence[Sequence[str]],
                        is_correct: Sequence[Sequence[bool]], title: str = "Text retrieval: image -> top captions"):
    """Return a figure with one row per image query: the image, then its top captions (green correct, red wrong)."""
    plt = _pyplot()
    rows = len(query_images)
    fig, axes = plt.subplots(rows, 2, figsize=(8.5, 1.75 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4.5]})
    for row, image in enumerate(query_images):
        axes[row, 0].imshow(to_display_image(image))
        _frame(axes[row, 0], None)
        axes[row, 1].axis("off")
        for rank, (caption, correct) in enumerate(zip(retrieved_captions[row], is_correct[row])):
            axes[row, 1].text(0.0, 1.0 - (rank + 0.5) / max(5, len(retrieved_captions[row])),
                              f"{rank + 1}. {textwrap.shorten(caption, 70)}", va="center", ha="left",
                              fontsize=9, color=CORRECT_COLOUR if correct else WRONG_COLOUR)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_embedding_map(points_2d: np.ndarray, kinds: Sequence[str], code_labels: Sequence[int] | None = None,
                       title: str = "UMAP of image features, text features and codes"):
    """Return a scatter of 2-d points coloured by kind ('image', 'text', 'code'); codes drawn as labelled stars."""
    plt = _pyplot()
    points_2d = np.asarray(points_2d)
    kinds = np.asarray(kinds)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    for kind, marker, size, alpha in (("image", "o", 9, 0.45), ("text", "^", 9, 0.45), ("code", "*", 160, 0.95)):
        selected = kinds == kind
        if selected.any():
            ax.scatter(points_2d[selected, 0], points_2d[selected, 1], s=size, marker=marker, alpha=alpha,
                       c=KIND_COLOURS[kind], label=f"{kind} ({int(selected.sum())})",
                       edgecolors="white" if kind == "code" else "none", linewidths=0.6)
    if code_labels is not None:
        for (x, y), label in zip(points_2d[kinds == "code"], code_labels):
            ax.annotate(str(label), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=9, markerscale=1.5)
    ax.set_title(title)
    fig.tight_layout()
    return fig




def top_words(captions: Sequence[str], count: int = 4,
              stopwords: frozenset[str] = CAPTION_STOPWORDS) -> list[tuple[str, int]]:
    """Return the `count` most frequent words of `captions` with their counts (ties alphabetical; stop words dropped)."""
    words = Counter(w for caption in captions for w in caption.lower().split() if w not in stopwords and len(w) > 1)
    return sorted(words.items(), key=lambda item: (-item[1], item[0]))[:count]


def distinctive_words(captions: Sequence[str], all_captions: Sequence[str], count: int = 4,
                      stopwords: frozenset[str] = CAPTION_STOPWORDS) -> list[tuple[str, int]]:
    """Return the `count` words of `captions` that best set them apart from `all_captions`, with their counts.

    Score = occurrences in `captions` x log(len(all_captions) / captions of `all_captions` containing the
    word) (tf-idf): a word in nearly every caption ("emoji") scores about 0 however often it occurs.
    """
    document_frequency = Counter(w for caption in all_captions for w in set(caption.lower().split()))
    counts = Counter(w for caption in captions for w in caption.lower().split() if w not in stopwords and len(w) > 1)
    total = max(1, len(all_captions))
    scored = [(n * math.log(total / max(1, document_frequency[w])), w, n) for w, n in counts.items()]
    return [(w, n) for _, w, n in sorted(scored, key=lambda item: (-item[0], item[1]))[:count]]


def plot_code_gallery(code_ids: Sequence[int], images_per_code: Sequence[Sequence[np.ndarray]],
                      words_per_code: Sequence[Sequence[tuple[str, int]]], sizes: Sequence[int] | None = None,
                      title: str = "Codes: their top images and most frequent caption words"):
    """Return a grid with one row per code: its most confident images and, as the row label, its top caption words."""
    plt = _pyplot()
    rows, cols = len(code_ids), max(1, max(len(images) for images in images_per_code))
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.3 * cols + 2.6, 1.35 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [2.0] + [1] * cols})
    for row, code in enumerate(code_ids):
        words = ", ".join(f'"{w}"' for w, _ in words_per_code[row]) or "(no caption)"
        label = f"code {code}" + (f"  (n={sizes[row]})" if sizes is not None else "")
        axes[row, 0].axis("off")
        axes[row, 0].text(0.0, 0.5, label + "\n" + "\n".join(textwrap.wrap(words, 24)), va="center", fontsize=8)
        for col in range(cols):
            ax = axes[row, col + 1]
            if col < len(images_per_code[row]):
                ax.imshow(to_display_image(images_per_code[row][col]))
                _frame(ax, None)
            else:
                ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_code_usage(image_counts: np.ndarray, text_counts: np.ndarray,
                    title: str = "Code usage (hard assignments, sorted by image count)"):
    """Return a bar chart of how many images and captions pick each code (codes sorted by image count)."""
    plt = _pyplot()
    image_counts, text_counts = np.asarray(image_counts), np.asarray(text_counts)
    order = np.argsort(-image_counts, kind="stable")
    positions = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(positions - 0.2, image_counts[order], width=0.4, color=KIND_COLOURS["image"], label="images")
    ax.bar(positions + 0.2, text_counts[order], width=0.4, color=KIND_COLOURS["text"], label="captions")
    ax.set_xlabel(f"code rank (of {len(order)} codes)")
    ax.set_ylabel("samples assigned")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_gradcam_rows(images: Sequence[np.ndarray], row_titles: Sequence[str],
                      panels: Sequence[Sequence[tuple[str, np.ndarray]]], title: str = "Grad-CAM",
                      alpha: float = 0.55, cmap: str = "jet"):
    """Return a grid with one row per image: the image, then one panel per (label, map) drawn over it.

    A map is any (h, w) non-negative array (a patch grid, or already upsampled): it is stretched over the
    whole image with bilinear interpolation and scaled per panel to its own maximum (min-max, as ALBEF's
    drawings), so panels show where each map is high, not how high it is next to another panel; an
    all-zero map is drawn as the bare image with "(zero)" in its label.
    """
    plt = _pyplot()
    if not (len(images) == len(row_titles) == len(panels)):
        raise ValueError(f"images, row_titles and panels must have one entry per row, got {len(images)}, "
                         f"{len(row_titles)} and {len(panels)}")
    rows, cols = len(images), 1 + max(len(row) for row in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(1.55 * cols, 1.9 * rows + 0.4), squeeze=False)
    for row, (image, row_title, maps) in enumerate(zip(images, row_titles, panels)):
        picture = to_display_image(image)
        height, width = picture.shape[:2]
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title("\n".join(textwrap.wrap(row_title, 22)), fontsize=7)
        _frame(axes[row, 0], None)
        for col in range(1, cols):
            ax = axes[row, col]
            if col > len(maps):
                ax.axis("off")
                continue
            label, cam = maps[col - 1]
            cam = np.asarray(cam, dtype=np.float64)
            ax.imshow(picture)
            peak = float(cam.max()) if cam.size else 0.0
            if peak > 0:
                ax.imshow(cam / peak, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear",
                          extent=(-0.5, width - 0.5, height - 0.5, -0.5))
            else:
                label = f"{label} (zero)"
            ax.set_title(textwrap.shorten(label, 24), fontsize=7)
            _frame(ax, None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Return the trailing moving average of `values` over `window` points (window 1 = unchanged)."""
    out, total, queue = [], 0.0, []
    for value in values:
        queue.append(value)
        total += value
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def plot_loss_curves(records: Sequence[dict] | str | os.PathLike, *, terms: Iterable[str] | None = None,
                     smooth_window: int = 1, axes=None, title: str | None = None):
    """Return a matplotlib Figure with one panel per loss term (and the total) against the optimizer step.

    `records` is a list of training records or the path of a metrics.jsonl file.
    """
    plt = _pyplot()
    if not isinstance(records, (list, tuple)):
        records = read_jsonl(records)
    terms = list(terms) if terms is not None else loss_terms(records)
    panels = ["total"] + terms
    if axes is None:
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
        axes = axes.ravel()
    else:
        fig = axes[0].figure
    for ax, name in zip(axes, panels):
        key = "loss" if name == "total" else LOSS_PREFIX + name
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, smooth(values, smooth_window), lw=1.5)
        ax.set_title("L (weighted total)" if name == "total" else f"L_{name}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in list(axes)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_series(records: Sequence[dict] | str | os.PathLike, keys: Sequence[str], *, axes=None,
                ylabels: Sequence[str] | None = None):
    """Return a Figure plotting the logged scalars `keys` (e.g. codebook_perplexity, lr) against the step."""
    plt = _pyplot()
    if not isinstance(records, (list, tuple)):
        records = read_jsonl(records)
    if axes is None:
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 2.8), squeeze=False)
        axes = axes.ravel()
    else:
        fig = axes[0].figure
    for i, (ax, key) in enumerate(zip(axes, keys)):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabels[i] if ylabels else key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig, figure_dir: str | Path, name: str) -> Path:
    """Return the path of `name`.png written into `figure_dir` (created if needed) at 120 dpi."""
    path = Path(figure_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
