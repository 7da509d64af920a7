"""A global batch split over two gloo processes gives the same losses, gradients and queues as one process.

This is the contract behind `sample_seeds`: contrastive columns are the teacher features of the
global batch, Sinkhorn runs over the global batch, ITM negatives are drawn from the global batch
with per-sample streams, and MLM averages over the global batch's masked tokens. "codis_views" is
codis with the teacher reading its own views (a second image, other captions of another length).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codis_lib.config import ModelConfig
from codis_lib.model import build_model
from tests.helpers import free_port

pytestmark = pytest.mark.slow  # spawns two gloo processes

BATCH, WORLD = 8, 2
MODES = ("clip", "codis", "codis_views")


def _setup(mode: str):
    torch.manual_seed(0)
    views = {"teacher_view": "own", "teacher_text_view": "other_caption"} if mode == "codis_views" else {}
    model = build_model(ModelConfig.preset("tiny").with_overrides(mode=mode.split("_")[0], queue_size=16,
                                                                  **views)).train()
    with torch.no_grad():  # a teacher that differs from the student, so distillation matters
        for param in model.visual_encoder_m.parameters():
            param.add_(0.02 * torch.randn_like(param))
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(BATCH, 3, 64, 64, generator=gen)
    input_ids = torch.randint(10, 4000, (BATCH, 12), generator=gen)
    input_ids[:, 0] = model.config.text.cls_token_id
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::3, 8:] = 0
    input_ids[attention_mask == 0] = 0
    image_ids = torch.tensor([0, 1, 2, 0, 3, 4, 2, 5])  # shared ids across the two halves
    seeds = torch.arange(BATCH) + 1000
    batch = {"image": image, "input_ids": input_ids, "attention_mask": attention_mask, "image_ids": image_ids,
             "sample_seeds": seeds}
    if views:  # the teacher's own views: another image, and captions of another length (padded globally)
        batch["image_teacher"] = image.flip(-1) + 0.1 * torch.randn(image.shape, generator=gen)
        batch["teacher_input_ids"] = torch.randint(10, 4000, (BATCH, 9), generator=gen)
        batch["teacher_input_ids"][:, 0] = model.config.text.cls_token_id
        batch["teacher_attention_mask"] = torch.ones_like(batch["teacher_input_ids"])
        batch["teacher_attention_mask"][1::3, 5:] = 0
        batch["teacher_input_ids"][batch["teacher_attention_mask"] == 0] = 0
    return model, batch


def _step(model, batch, part: slice) -> dict:
    inputs = {key: value[part] for key, value in batch.items()}
    image, input_ids, attention_mask = inputs.pop("image"), inputs.pop("input_ids"), inputs.pop("attention_mask")
    output = model(image, input_ids, attention_mask, alpha=0.4, **inputs)
    output.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {"losses": {k: v.detach() for k, v in output.losses.items()}, "grads": grads,
            "image_queue": model.image_queue.clone(), "idx_queue": model.idx_queue.clone(),
            "queue_ptr": model.queue_ptr.clone()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for mode in MODES:
            model, batch = _setup(mode)
            half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            result = _step(model, batch, half)
            dist.all_reduce(result["grads"])  # what DDP does: average the gradients over processes
            result["grads"] /= WORLD
            results[mode] = result
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_split_batch_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    singles = {}
    for mode in MODES:
        model, batch = _setup(mode)
        single = singles[mode] = _step(model, batch, slice(0, BATCH))
        for term, value in single["losses"].items():
            split = sum(r[mode]["losses"][term] for r in ranks) / WORLD  # DDP optimises the mean of rank losses
            torch.testing.assert_close(split, value, atol=2e-5, rtol=2e-5, msg=f"{mode}: loss {term}")
        for r in ranks:
            torch.testing.assert_close(r[mode]["grads"], single["grads"], atol=2e-5, rtol=1e-4,
                                       msg=f"{mode}: gradients")
            torch.testing.assert_close(r[mode]["image_queue"], single["image_queue"], atol=1e-6, rtol=0)
            assert torch.equal(r[mode]["idx_queue"], single["idx_queue"])
            assert torch.equal(r[mode]["queue_ptr"], single["queue_ptr"])
    assert int(single["queue_ptr"]) == BATCH  # codis (the last mode) enqueued the whole global batch
    assert not torch.equal(singles["codis_views"]["image_queue"], singles["codis"]["image_queue"])  # views used
