"""Notebook 07's machinery: what the paper's full pretraining needs, its torchrun command, and running it.

The paper's recipe is `codis_lib/configs/pretrain_4m.yaml`: base CODIS (ViT-B/16 from DeiT-B, BERT-base),
ALBEF's 4M image-text lists, 64 images per GPU on 8 GPUs, 30 epochs. `launch_requirements` lists, in
words, everything this machine lacks for a given run (GPUs, files, pretrained weights, tokenizer);
`torchrun_command` builds the launch line; `run_command` runs it from Python (a notebook), streaming
and saving its output. The same functions run the CPU smoke test of notebook 07 (tiny model, emoji
corpus, 2 processes), so the CI exercises the path a user with 8 GPUs takes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence


def _hub_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Return True when `filename` of hub repo `repo_id` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return isinstance(found, str) and os.path.isfile(found)


def _weights_problem(source: str | None, field: str) -> str | None:
    """Return what is missing for model.<field>.pretrained = source, or None when it is available."""
    if not source:
        return None
    if Path(source).exists():
        return None
    if field == "vision":
        import timm

        config = timm.models.get_pretrained_cfg(source)
        repo = config.hf_hub_id if config is not None else None
    else:
        repo = source
    if repo is not None and _hub_cached(repo):
        return None
    return (f"model.{field}.pretrained = {source!r}: not a local file and not in the Hugging Face cache "
            f"(needs internet access once, or a local copy: see codis_lib/model/pretrained.py)")


def launch_requirements(run_config, nproc_per_node: int, *, gpus: bool = True, nnodes: int = 1) -> list[str]:
    """Return what this machine lacks to run `run_config` with `nproc_per_node` processes (empty list: nothing).

    gpus=True requires one CUDA device per process (the paper's recipe); gpus=False is a CPU run.
    """
    missing = []
    data, model = run_config.data, run_config.model
    if gpus:
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < nproc_per_node:
            missing.append(f"{nproc_per_node} CUDA GPUs on this node (one per process, --nproc_per_node "
                           f"{nproc_per_node}); found {found}")
    if data.dataset == "albef_json":
        absent = [f for f in data.train_files if not Path(f).is_file()]
        if absent:
            missing.append(f"the pretraining lists data.train_files: {len(absent)} of {len(data.train_files)} "
                           f"missing ({', '.join(absent)}); data/README.md says where ALBEF publishes them")
        if data.image_root and not Path(data.image_root).is_dir():
            missing.append(f"the image folder data.image_root = {data.image_root!r} (the COCO, VG, SBU and CC3M images)")
        for name in ("val_file", "test_file"):
            path = getattr(data, name)
            if path and not Path(path).is_file():
                missing.append(f"the retrieval test file data.{name} = {path!r} (for the zero-shot evaluation)")
        tokenizer = data.tokenizer or "bert-base-uncased"
        if not Path(tokenizer).is_dir() and not _hub_cached(tokenizer, "tokenizer.json") \
                and not _hub_cached(tokenizer, "vocab.txt"):
            missing.append(f"the tokenizer data.tokenizer = {tokenizer!r} (not in the Hugging Face cache)")
    for source, field in ((model.vision.pretrained, "vision"), (model.text.pretrained, "text")):
        problem = _weights_problem(source, field)
        if problem:
            missing.append(problem)
    if nnodes > 1:
        missing.append(f"{nnodes} nodes: launch torchrun on each with --nnodes {nnodes} and a rendezvous "
                       "endpoint (--rdzv-endpoint host:port); this notebook starts one node only")
    return missing


def torchrun_command(config_name: str, overrides: Mapping[str, object], *, nproc_per_node: int,
                     task: str = "pretrain", extra_args: Sequence[str] = ()) -> list[str]:
    """Return the argument list of `torchrun --standalone --nproc_per_node N -m codis_lib.train.cli <task> ...`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
               "-m", "codis_lib.train.cli", task, "--config", config_name]
    for key, value in overrides.items():
        if value is None:
            value = "null"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        command += ["--set", f"{key}={value}"]
    return command + list(extra_args)


@dataclass
class CommandResult:
    """How a launched command ended, and where its output went."""

    returncode: int
    seconds: float
    log_file: Path
    tail: str  # the last lines of its output


def run_command(command: Sequence[str], log_file: str | os.PathLike, *, env: Mapping[str, str] | None = None,
                cwd: str | os.PathLike | None = None, echo: bool = True, timeout_s: float | None = None,
                tail_lines: int = 40) -> CommandResult:
    """Return the CommandResult of running `command`, its output streamed (echo) and saved to `log_file`.

    timeout_s is checked whenever the command prints a line; the command is killed once it is exceeded.
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lines: list[str] = []
    with open(log_file, "w") as log, subprocess.Popen(
            list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **(env or {})}, cwd=cwd) as process:
        try:
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                if echo:
                    print(line, end="", flush=True)
                if timeout_s is not None and time.perf_counter() - started > timeout_s:
                    process.kill()
                    lines.append(f"[killed after {timeout_s:.0f} s]\n")
                    break
        finally:
            returncode = process.wait()
    return CommandResult(returncode=returncode, seconds=time.perf_counter() - started, log_file=log_file,
                         tail="".join(lines[-tail_lines:]))
