"""Training: configs, the DDP training loop, checkpoints, schedules and logs (see engine.py)."""
