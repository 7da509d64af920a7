"""Training: the torchrun/DDP training loop, its setup, the run folder, schedules, sampler and logs.

    >>> from codis_lib import load_run_config, run_training      # the public face re-exports these
    >>> result = run_training(load_run_config("pretrain_emoji", overrides=["train.epochs=1"]))

Submodules: engine (`train` and its `train_step`), setup (processes, precision, data, model, optimizer),
run_dir (output folder, checkpoints, final link), schedule, sampler, metrics (metrics.jsonl,
TensorBoard, loss-curve plots), pretrained (`pretrain_or_load`), cli. The run config lives in
`codis_lib.run_config`, checkpoint files in `codis_lib.checkpoint`, loading a trained model in
`codis_lib.evaluation.models`. Nothing is imported here, so that `codis_lib.train.cli` can set up the
process (threading environment) before torch is imported.
"""
