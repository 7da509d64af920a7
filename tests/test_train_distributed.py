"""torchrun with 2 gloo processes at batch b computes what 1 process at batch 2b computes.

Both runs go through the real command line (`python -m torch.distributed.run ... -m codis_lib.train.cli
pretrain`): DistributedDataParallel, the global-batch sampler, teacher features and Sinkhorn marginals
gathered over ranks, ITM hard negatives drawn from the global batch with per-sample seeds. Dropout is
0 (its masks come from each process's own generator); augmentation stays on (items are seeded per
sample, so it does not depend on the split either). With the teacher's own views on, the second image
and the other captions are seeded per sample too, and the teacher captions are padded globally.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from codis_lib.checkpoint import load_checkpoint
from tests.helpers import free_port, tiny_run_overrides

STEPS = 3
TOLERANCE = 1e-5


def _run(command, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(cwd))
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    return completed


def _records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# With the teacher's own views two weight elements here get a first-step gradient at rounding level
# (~5e-9, against a median of 2e-4 to 2e-3 in their tensors); AdamW's first update lr * g / (|g| + eps)
# turns the two layouts' rounding differences there into weight differences of 4.7e-5 (eps 1e-8). An
# eps of 1e-6, still far below the real gradients, keeps such elements from deciding the comparison.
# The laptop recipe's student columns (gradient through the gathered batch features) do the same to a few
# elements of the first ViT block (fc1): losses agree to 2e-6, so both cases compare with eps 1e-6.
# "one view" is the main recipe as it is (no L_mlm, unpadded text layers); "own views" also turns L_mlm on, so that
# the masked tokens' global count and the teacher's MLM pass over its own image are compared too.
VIEWS = {"one view": ["train.optimizer.eps=1e-6"],
         "own views": ["model.teacher_view=own", "model.teacher_text_view=other_caption", "train.optimizer.eps=1e-6",
                       "model.losses.mlm=true"]}


@pytest.mark.slow
@pytest.mark.parametrize("views", list(VIEWS))
def test_two_processes_at_batch_b_match_one_process_at_batch_2b(tmp_path, views):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # augmentation on (the laptop recipe turns it off): the per-sample seeded crops and flips are part of the claim
    common = ["model.text.hidden_dropout=0", "model.text.attention_dropout=0", "data.augment=true", *VIEWS[views]]
    single_dir, pair_dir = tmp_path / "one_process", tmp_path / "two_processes"
    single = tiny_run_overrides(single_dir, STEPS) + common + ["train.batch_size=16"]
    pair = tiny_run_overrides(pair_dir, STEPS) + common + ["train.batch_size=8"]
    cli = ["-m", "codis_lib.train.cli", "pretrain"]
    _run([sys.executable, *cli, *[a for v in single for a in ("--set", v)]], repo)
    launched = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                     "127.0.0.1", "--master_port", str(free_port()), *cli,
                     *[a for v in pair for a in ("--set", v)]], repo)
    assert "2 process(es) x batch 8" in launched.stdout  # really two ranks, 8 each

    one, two = _records(single_dir), _records(pair_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))  # rank 0 logs alone
    terms = [k for k in one[0] if k.startswith("loss/")]
    with_mlm = "model.losses.mlm=true" in VIEWS[views]
    assert set(terms) == {"loss/align", "loss/code", "loss/ot", "loss/itm"} | ({"loss/mlm"} if with_mlm else set())
    worst = max(abs(a[k] - b[k]) for a, b in zip(one, two) for k in terms + ["loss"])
    print(f"largest per-step loss difference over {STEPS} steps: {worst:.2e}")
    for a, b in zip(one, two):
        for key in terms + ["loss"]:
            assert abs(a[key] - b[key]) <= TOLERANCE, f"step {a['step']} {key}: {a[key]} vs {b[key]}"
    # The losses moved (the test would pass trivially on a frozen model otherwise) ...
    assert abs(one[-1]["loss"] - one[0]["loss"]) > 1e-3
    # ... and the trained weights, teacher, queues and codebook agree too.
    final_one = load_checkpoint(single_dir / "checkpoint_final.pt")["model"]
    final_two = load_checkpoint(pair_dir / "checkpoint_final.pt")["model"]
    for key, value in final_one.items():
        other = final_two[key]
        if not value.is_floating_point():
            assert torch.equal(other, value), key
            continue
        if key.endswith("attn.qkv.bias"):
            # The key bias adds the same constant to every score of a query, which softmax ignores: its true
            # gradient is 0, so AdamW turns the rounding noise of each process layout into lr-sized steps.
            # Compare the query and value thirds only.
            third = value.shape[0] // 3
            value, other = torch.cat([value[:third], value[2 * third:]]), torch.cat([other[:third], other[2 * third:]])
        elif key.endswith("key.bias"):  # the same for BERT's (cross-)attention key biases
            continue
        torch.testing.assert_close(other, value, atol=1e-5, rtol=1e-4, msg=key)
