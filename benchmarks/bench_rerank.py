"""ITM re-ranking: batched (codis_lib) against ALBEF's one-query-at-a-time loop, same model, data and k.

Both compute ALBEF's re-ranked score matrices for text and image retrieval from the same features:
the reference runs one fusion batch of k pairs per query (ALBEF's Retrieval.py); the batched
version scores each distinct (image, caption) pair once, groups pairs by image so the image tokens
go through each fusion call once, trims caption padding per batch, computes the first fusion layer's
caption-only self-attention once per caption, and runs the last fusion layer at [CLS] only (the one
position the ITM head reads). The scores are checked to
agree to 1e-5 before any time is reported. The runs are interleaved (reference, batched, ...) and
repeated; the script prints the median, the spread (min-max) and the ratio of medians, plus the load
average, because these machines are shared and noisy.

    python benchmarks/bench_rerank.py                              # tiny CODIS (random init), 130 emoji test images, k=128
    python benchmarks/bench_rerank.py --threads 2 --repeats 5
    python benchmarks/bench_rerank.py --checkpoint notebooks/outputs/04/checkpoint_final.pt
    python benchmarks/bench_rerank.py --attribution                # also: each saving turned off in turn
    python benchmarks/bench_rerank.py --device cuda --images 1002  # the whole emoji test split on a GPU

Needs the emoji corpus (codis-build-emoji). 130 images (about 420 captions) keep k=128 meaningful in
both directions (k < number of images) and a 1-thread run of 3 repeats near 3 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from codis_lib.evaluation.retrieval import (RetrievalFeatures, compute_features, itm_rerank_batched,
                                            itm_rerank_one_query_at_a_time)

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO_ROOT / "data" / "emoji"),
                        help="emoji corpus folder (test.json, tokenizer/)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--images", type=int, default=130, help="first N images of the split, with all their captions")
    parser.add_argument("--k", type=int, default=128, help="candidates re-ranked per query (ALBEF: 128 Flickr, 256 COCO)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pair-batch-size", type=int, default=1024, help="pairs per fusion call in the batched version")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is the stable choice on a shared 2-core machine)")
    parser.add_argument("--checkpoint", default=None, help="a training checkpoint; default: tiny CODIS, random init, seed 0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attribution", action="store_true",
                        help="also time the batched version with each of its savings turned off in turn")
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    return parser.parse_args(argv)


def load_model_and_tokenizer(args):
    """Return (model in eval mode, tokenizer, description)."""
    from codis_lib.data.tokenizer import load_tokenizer

    if args.checkpoint:
        from codis_lib.evaluation.models import load_trained_model

        trained = load_trained_model(args.checkpoint, device=args.device)
        return trained.model, trained.tokenizer, f"checkpoint {args.checkpoint} (step {trained.step})"
    from codis_lib.config import ModelConfig
    from codis_lib.model import build_model

    tokenizer = load_tokenizer(Path(args.data_root) / "tokenizer")
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny").with_tokenizer(tokenizer)).to(args.device).eval()
    return model, tokenizer, "tiny CODIS, random init (seed 0)"


def head_features(model, tokenizer, dataset, num_images: int, device) -> RetrievalFeatures:
    """Return the features of the first `num_images` images of `dataset` and all of their captions."""
    from codis_lib.data.collate import tokenize_captions

    texts = [dataset.texts[t] for image in range(num_images) for t in dataset.img2txt[image]]
    tokens = tokenize_captions(tokenizer, texts)  # padded to the longest of these captions
    image_batches = (torch.stack([dataset[i]["image"] for i in range(start, min(num_images, start + 64))])
                     for start in range(0, num_images, 64))
    return compute_features(model, image_batches, tokens["input_ids"], tokens["attention_mask"], device=device)


def first_images(features: RetrievalFeatures, dataset, num_images: int) -> RetrievalFeatures:
    """Return the part of `features` (made by head_features) that covers the first `num_images` images."""
    num_texts = sum(len(dataset.img2txt[image]) for image in range(num_images))
    return RetrievalFeatures(features.image_embeds[:num_images], features.image_feat[:num_images],
                             features.text_embeds[:num_texts], features.text_feat[:num_texts],
                             features.text_attention_mask[:num_texts])


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from codis_lib.data.datasets import RetrievalEvalDataset

    annotation = Path(args.data_root) / f"{args.split}.json"
    if not annotation.is_file():
        print(f"bench_rerank: {annotation} not found; build the corpus first: codis-build-emoji", file=sys.stderr)
        return 2
    model, tokenizer, described = load_model_and_tokenizer(args)
    dataset = RetrievalEvalDataset(annotation, image_size=model.config.vision.image_size, check_images="exists")
    num_images = min(args.images, len(dataset))
    features = head_features(model, tokenizer, dataset, num_images, args.device)
    k = args.k
    print(f"bench_rerank: {described}; {features.num_images} images, {features.num_texts} captions "
          f"(caption tokens padded to {features.text_embeds.shape[1]}), k={k}, device={args.device}, "
          f"threads={torch.get_num_threads()}, pair batch {args.pair_batch_size}")

    variants = {
        "one query at a time (ALBEF)": lambda: itm_rerank_one_query_at_a_time(model, features, k, distributed=False),
        "batched": lambda: itm_rerank_batched(model, features, k, pair_batch_size=args.pair_batch_size,
                                              distributed=False),
    }
    if args.attribution:  # each variant turns one saving off
        for name, option in (("image tokens per pair", "share_image_tokens"), ("no pair dedup", "deduplicate"),
                             ("no padding trim", "trim_padding"), ("text self-attn per pair", "share_text_work"),
                             ("last layer on every token", "first_token_only")):
            variants[f"batched, {name}"] = (lambda option=option: itm_rerank_batched(
                model, features, k, pair_batch_size=args.pair_batch_size, distributed=False, **{option: False}))

    def synchronize():
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    # warm-up on a few queries, so that one-off initialisation is not billed to the first variant
    warm = first_images(features, dataset, min(8, num_images))
    itm_rerank_one_query_at_a_time(model, warm, k, distributed=False)
    itm_rerank_batched(model, warm, k, pair_batch_size=args.pair_batch_size, distributed=False)

    load_before = os.getloadavg()
    seconds = {name: [] for name in variants}
    results = {}
    for repeat in range(args.repeats):
        for name, run in variants.items():
            synchronize()
            start = time.perf_counter()
            results[name] = run()
            synchronize()
            seconds[name].append(time.perf_counter() - start)
        if repeat == 0:  # same scores, or no timing at all
            reference = results["one query at a time (ALBEF)"]
            for name, result in results.items():
                diff = max(float((result.scores_i2t - reference.scores_i2t).abs().max()),
                           float((result.scores_t2i - reference.scores_t2i).abs().max()))
                if diff > 1e-5:
                    print(f"bench_rerank: {name} differs from the reference by {diff:.2e} > 1e-5", file=sys.stderr)
                    return 1
                print(f"  scores of {name!r}: max |diff| to the reference {diff:.1e}")
        print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()),
              flush=True)
    load_after = os.getloadavg()

    reference_name = "one query at a time (ALBEF)"
    reference_median = statistics.median(seconds[reference_name])
    batched = results["batched"]
    print(f"\nITM re-ranking, k={k}: {batched.pairs_requested} (query, candidate) pairs, "
          f"{batched.pairs_scored} distinct pairs scored by the batched version")
    print(f"{'variant':<40}{'median s':>10}{'min-max s':>16}{'pairs/s':>10}{'speed-up':>10}")
    summary = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        speedup = reference_median / median
        per_repeat = [r / b for r, b in zip(seconds[reference_name], times)]
        summary[name] = {"median_s": median, "min_s": min(times), "max_s": max(times), "speedup": speedup,
                         "speedup_per_repeat": per_repeat}
        print(f"{name:<40}{median:>10.2f}{f'{min(times):.2f}-{max(times):.2f}':>16}"
              f"{batched.pairs_requested / median:>10.0f}{speedup:>9.2f}x")
    ratios = summary["batched"]["speedup_per_repeat"]
    print(f"\nbatched vs one query at a time: {summary['batched']['speedup']:.2f}x (ratio of medians; "
          f"per repeat {min(ratios):.2f}-{max(ratios):.2f}x); load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after, on {os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": described, "images": features.num_images, "captions": features.num_texts, "k": k,
            "threads": torch.get_num_threads(), "device": args.device, "pairs_requested": batched.pairs_requested,
            "pairs_scored": batched.pairs_scored, "variants": summary,
            "load_average": [load_before[0], load_after[0]]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
