"""The retrieval numbers of the CODIS poster (CVPR 2022), transcribed for side-by-side tables.

Source: the poster's two tables (the CODIS poster, Duan, Chen et al., CVPR 2022), "Performance comparison of zero-shot / finetuned
image-text retrieval on MSCOCO (5K) and Flickr30K (1K)". Only the two rows this project reproduces
are kept: ALBEF trained on 4M images and CODIS ("Ours"). Recall in percent, ALBEF's metric names.
In ALBEF's paper the zero-shot Flickr30K column is evaluated with the model fine-tuned on COCO, and
the CODIS paper compares against those numbers. What each row was measured with (checkpoint, image
size, test file, k_test) is `codis_lib.evaluation.protocol.PROTOCOL`.
"""
from __future__ import annotations

METRIC_ORDER = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")


def _row(*values: float) -> dict[str, float]:
    row = dict(zip(METRIC_ORDER, values))
    row["txt_r_mean"] = sum(values[:3]) / 3
    row["img_r_mean"] = sum(values[3:]) / 3
    row["r_mean"] = (row["txt_r_mean"] + row["img_r_mean"]) / 2
    return row


# PAPER_RESULTS[setting][dataset][method] -> metric dict
PAPER_RESULTS: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "zero-shot": {
        "coco": {"ALBEF 4M": _row(68.6, 89.5, 94.7, 50.1, 76.4, 84.5),
                 "CODIS": _row(71.5, 91.1, 95.5, 53.9, 79.5, 87.1)},
        "flickr": {"ALBEF 4M": _row(90.5, 98.8, 99.7, 76.8, 93.7, 96.7),
                   "CODIS": _row(91.7, 99.3, 99.8, 79.7, 94.8, 97.3)},
    },
    "fine-tuned": {
        "coco": {"ALBEF 4M": _row(73.1, 91.4, 96.0, 56.8, 81.5, 89.2),
                 "CODIS": _row(75.3, 92.6, 96.6, 58.7, 82.8, 89.7)},
        "flickr": {"ALBEF 4M": _row(94.3, 99.4, 99.8, 82.8, 96.7, 98.4),
                   "CODIS": _row(95.1, 99.4, 99.9, 83.3, 96.1, 97.8)},
    },
}
DATASET_NAMES = {"coco": "MSCOCO (5K)", "flickr": "Flickr30K (1K)"}


def paper_rows(setting: str, dataset: str) -> dict[str, dict[str, float]]:
    """Return {method: metric dict} of the poster for `setting` ("zero-shot" | "fine-tuned") and `dataset` ("coco" | "flickr")."""
    if setting not in PAPER_RESULTS:
        raise ValueError(f"setting must be one of {tuple(PAPER_RESULTS)}, got {setting!r}")
    if dataset not in PAPER_RESULTS[setting]:
        raise ValueError(f"dataset must be one of {tuple(PAPER_RESULTS[setting])}, got {dataset!r}")
    return {f"{method} (paper, {DATASET_NAMES[dataset]})": row
            for method, row in PAPER_RESULTS[setting][dataset].items()}


def format_poster_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """Return a text table in the poster's layout: Method | TR R@1 R@5 R@10 | IR R@1 R@5 R@10 | mean."""
    width = max([len("Method")] + [len(name) for name in rows]) + 2
    lines = [title] if title else []
    lines.append(f"{'':<{width}}{'Text Retrieval':^21}  {'Image Retrieval':^21}")
    lines.append(f"{'Method':<{width}}{'R@1':>7}{'R@5':>7}{'R@10':>7}  {'R@1':>7}{'R@5':>7}{'R@10':>7}{'mean':>8}")
    lines.append("-" * (width + 51))
    for name, metrics in rows.items():
        text = "".join(f"{metrics[key]:7.1f}" for key in METRIC_ORDER[:3])
        image = "".join(f"{metrics[key]:7.1f}" for key in METRIC_ORDER[3:])
        mean = metrics.get("r_mean", sum(metrics[key] for key in METRIC_ORDER) / 6)
        lines.append(f"{name:<{width}}{text}  {image}{mean:8.1f}")
    return "\n".join(lines)


def format_poster_markdown(rows: dict[str, dict[str, float]]) -> str:
    """Return the same table as markdown (for notebooks and the README)."""
    lines = ["| Method | TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 | mean |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, metrics in rows.items():
        mean = metrics.get("r_mean", sum(metrics[key] for key in METRIC_ORDER) / 6)
        lines.append(f"| {name} | " + " | ".join(f"{metrics[key]:.1f}" for key in METRIC_ORDER) + f" | {mean:.1f} |")
    return "\n".join(lines)
