"""Training: the torchrun/DDP training loop, its setup, the run folder, schedules, sampler and launching.

    >>> from codis_lib import load_run_config, run_training      # the public face re-exports these
    >>> result = run_training(load_run_config("pretrain_emoji", overrides=["train.epochs=1"]))

Submodules, in the order a run meets them:
- cli: `codis-pretrain` / `codis-finetune`; launch: the full recipe's torchrun command (notebook 07);
- engine: `train` and its `train_step`;
- process: rank, device, CPU threads, precision; setup: building the run (model, optimizer, schedule)
  and wrapping it (DDP, torch.compile, autocast); data: tokenizer, dataset, sampler, loader (sampler:
  the seeded global batches); batches: what each batch needs before the forward;
- resume: where a run starts (its checkpoint, train.init_from, or scratch), with data_order's check;
- schedule, guards (NaN/inf), signals (SIGTERM), reference (the early loss-curve check; reference_runs
  measures one), run_dir and lock (the output folder, checkpoints, final link);
- load_or_train: the notebooks' starting model (a checkpoint, or a short run that writes one).
The run config lives in `codis_lib.run_config`, the training log in `codis_lib.metrics_log` (its
figures in `codis_lib.viz`), checkpoint files in `codis_lib.checkpoint`, pretrained weights in
`codis_lib.model.pretrained`, loading a trained model in `codis_lib.evaluation.models`. Nothing is
imported here, so that `codis_lib.train.cli` can set up the process (threading environment) before
torch is imported.
"""
