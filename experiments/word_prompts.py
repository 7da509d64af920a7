"""Where single-word queries fail: the words, or the drawings? Word hit@5 on three galleries, four phrasings.

`codis-eval CKPT --queries` asks a checkpoint 150 everyday words (codis_lib.evaluation.word_queries) on the
new_drawings and new_style galleries. This script asks the same words of the same checkpoints on a third
gallery, the training images themselves (one image per distinct training drawing, 3,872), and phrases
each word four ways (CLIP-style prompts; the features of an ensemble's phrasings are averaged):

- `bare`: the word alone ("cat"), as codis-eval asks it;
- `emoji`: "cat emoji";  `a_emoji`: "a cat emoji";
- `ensemble`: the mean of the bare and "emoji" phrasings.

If a word is answered on the drawings the model trained on but not on a new drawing of the same emoji,
the text side knows the word and the image side does not carry it across drawings; if a phrasing closer
to the training captions helps, the bare word's form was the problem.

    python experiments/word_prompts.py runs/pretrain_emoji/checkpoint_final.pt [more checkpoints]

Prints one table per checkpoint (hit@5 in %, words scored) and, with several, the mean over them.
About a minute per checkpoint on one CPU thread (the trunk's pass over the 3,872 training images).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

PHRASINGS = {"bare": ("{}",), "emoji": ("{} emoji",), "a_emoji": ("a {} emoji",), "ensemble": ("{}", "{} emoji")}
GALLERIES = ("train", "new_drawings", "new_style")


def training_gallery(data_root: Path, folder: Path) -> Path:
    """Write an evaluation file with one record per distinct training image (its first record's captions)."""
    records: dict[str, list[str]] = {}
    for record in json.loads((data_root / "pretrain.json").read_text()):
        records.setdefault(record["image"], record["caption"])
    path = folder / "train_gallery.json"
    path.write_text(json.dumps([{"image": image, "caption": captions} for image, captions in records.items()]))
    return path


@torch.no_grad()
def phrased_features(model, tokenizer, words, templates) -> torch.Tensor:
    """Return unit text features (W, d): each word's phrasings encoded and averaged."""
    from codis_lib.data.collate import tokenize_captions

    feats = []
    for template in templates:
        tokens = tokenize_captions(tokenizer, [template.format(word) for word in words])
        feats.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"])[1])
    return F.normalize(torch.stack(feats).mean(0), dim=-1)


def hit_at_k(query_feat, image_feat, names, words, k: int = 5) -> tuple[float, int]:
    """Return (% of answerable words with an answering image in their top k, number of answerable words)."""
    from codis_lib.evaluation.word_queries import answering_images

    order = (query_feat @ image_feat.t()).argsort(dim=1, descending=True)[:, :k].tolist()
    hits = [any(i in answers for i in top) for top, answers in
            zip(order, (set(answering_images(word, names)) for word in words)) if answers]
    return 100.0 * sum(hits) / len(hits), len(hits)


def measure(checkpoint: str, data_root: Path) -> dict:
    from codis_lib.data.datasets import RetrievalEvalDataset
    from codis_lib.evaluation.models import load_trained_model
    from codis_lib.evaluation.report import retrieval_split_dataset
    from codis_lib.evaluation.word_queries import EVERYDAY_WORDS, gallery_image_features, gallery_names

    trained = load_trained_model(checkpoint)
    model, tokenizer, config = trained.model, trained.tokenizer, trained.run_config
    size = trained.model_config.vision.image_size
    words = list(EVERYDAY_WORDS)
    queries = {name: phrased_features(model, tokenizer, words, templates) for name, templates in PHRASINGS.items()}
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for gallery in GALLERIES:
            if gallery == "train":
                dataset = RetrievalEvalDataset(training_gallery(data_root, Path(tmp)), image_root=data_root,
                                               image_size=size)
            else:
                dataset = retrieval_split_dataset(config, gallery)
            names = gallery_names(dataset, data_root / "manifest.json")
            image_feat = gallery_image_features(model, dataset, batch_size=128)
            result[gallery] = {name: hit_at_k(query, image_feat, names, words) for name, query in queries.items()}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data-root", default="data/emoji")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_root = Path(args.data_root)
    if not (data_root / "pretrain.json").is_file():
        print(f"word_prompts: no emoji corpus in {data_root} (no pretrain.json); run codis-build-emoji", file=sys.stderr)
        return 2
    results = {}
    for checkpoint in args.checkpoints:
        results[checkpoint] = measure(checkpoint, data_root)
        print(f"\n{checkpoint}: word hit@5 in % (words scored)")
        print(f"{'phrasing':<10s}" + "".join(f"{g:>18s}" for g in GALLERIES))
        for name in PHRASINGS:
            print(f"{name:<10s}" + "".join(f"{results[checkpoint][g][name][0]:>12.1f} ({results[checkpoint][g][name][1]:>3d})"
                                           for g in GALLERIES))
    if len(results) > 1:
        print(f"\nmean +- std over the {len(results)} checkpoints, word hit@5 in %")
        for name in PHRASINGS:
            cells = []
            for gallery in GALLERIES:
                values = [r[gallery][name][0] for r in results.values()]
                cells.append(f"{statistics.mean(values):>10.1f} +- {statistics.stdev(values):4.1f}")
            print(f"{name:<10s}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
