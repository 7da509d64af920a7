"""Notebook 07's machinery: what the paper's full pretraining needs, its torchrun command, and running it.

The paper's recipe is `codis_lib/configs/pretrain_4m.yaml`: base CODIS (ViT-B/16 from DeiT-B, BERT-base),
ALBEF's 4M image-text lists, 64 images per GPU on 8 GPUs, 30 epochs. `launch_requirements` lists, in
words, everything this machine lacks for a given run (GPUs, files, pretrained weights, tokenizer);
`torchrun_command` builds the launch line; `run_command` runs it from Python (a notebook), streaming
and saving its output. The same functions run the CPU smoke test of notebook 07 (tiny model, emoji
corpus, 2 processes), so the CI exercises the path a user with 8 GPUs takes.

`plan_run` chooses what notebook 07 runs on the machine at hand: with CUDA GPUs the paper's recipe
(pretrain_4m, one process per GPU, NCCL); without, the main command's recipe (pretrain_emoji, the
config and engine of `codis-pretrain`) in one process, through torchrun or in the calling process.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

LAUNCHERS = ("torchrun", "inprocess")  # a torchrun subprocess, or codis_lib.train.engine.train in this process
CPU_LAUNCHER = "torchrun"  # the default without GPUs (see plan_run)


def _hub_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Return True when `filename` of hub repo `repo_id` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return isinstance(found, str) and os.path.isfile(found)


def _packaged_problem(source: str, field: str, backbone: str) -> str | None | bool:
    """Return what is missing for a packaged source ("imagenet" Lite0, "minilm"), None if installed, False if not one."""
    try:
        if field == "vision" and backbone == "efficientnet_lite0" and source == "imagenet":
            from codis_lib.model.efficientnet import efficientnet_lite0_weights_path

            efficientnet_lite0_weights_path()
            return None
        from codis_lib.data.packaged import is_packaged_name, packaged_model_dir

        if field == "text" and is_packaged_name(source):
            packaged_model_dir(source)
            return None
    except (OSError, ImportError) as error:  # the package or its file is missing; the message says how to install
        return f"model.{field}.pretrained = {source!r}: {error}"
    return False


def _weights_problem(source: str | None, field: str, backbone: str = "vit") -> str | None:
    """Return what is missing for model.<field>.pretrained = source, or None when it is available."""
    if not source:
        return None
    if Path(source).exists():
        return None
    packaged = _packaged_problem(source, field, backbone)
    if packaged is not False:
        return packaged
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
        problem = _weights_problem(source, field, model.vision.backbone)
        if problem:
            missing.append(problem)
    if nnodes > 1:
        missing.append(f"{nnodes} nodes: launch torchrun on each with --nnodes {nnodes} and a rendezvous "
                       "endpoint (--rdzv-endpoint host:port); this notebook starts one node only")
    return missing


@dataclass(frozen=True)
class RunPlan:
    """What notebook 07 runs here: the config, how many processes, how they start, and why."""

    config_name: str
    nproc_per_node: int
    launcher: str  # one of LAUNCHERS
    gpus: bool  # one CUDA device per process (NCCL between them); False: CPU (gloo when several processes)
    omp_threads: int  # OMP_NUM_THREADS of each process: the cores shared among the processes
    reason: str  # one line: what was found, and what follows from it

    @property
    def backend(self) -> str:
        """Return the process-group backend ("none" for a single process, which needs no group)."""
        if self.nproc_per_node == 1:
            return "none"
        return "nccl" if self.gpus else "gloo"


def plan_run(config_name: str | None = None, nproc_per_node: int | None = None, launcher: str | None = None, *,
             device: str = "auto", gpu_count: int | None = None, cpu_count: int | None = None) -> RunPlan:
    """Return the RunPlan for this machine; every argument left None is chosen from what it finds.

    With CUDA GPUs (`gpu_count`, default: the visible ones; none when device is "cpu"): the paper's
    recipe pretrain_4m, one torchrun process per GPU. Without: the main command's recipe pretrain_emoji
    (`codis-pretrain`'s config and engine) in one process, launched by CPU_LAUNCHER.
    `launcher="inprocess"` runs one process only.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    if launcher is not None and launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r}: expected one of {', '.join(map(repr, LAUNCHERS))}")
    if nproc_per_node is not None and (not isinstance(nproc_per_node, int) or nproc_per_node < 1):
        raise ValueError(f"nproc_per_node={nproc_per_node!r}: expected a whole number >= 1")
    if device == "cpu":
        gpu_count = 0
    elif gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = cpu_count or os.cpu_count() or 1
    gpus = gpu_count > 0
    if gpus:
        found = f"{gpu_count} CUDA GPU(s) found: the paper's recipe, one process per GPU"
        config_name = config_name or "pretrain_4m"
        nproc_per_node = nproc_per_node or gpu_count
    else:
        found = ("device 'cpu'" if device == "cpu" else "no CUDA GPU found") + \
            ": the main command's recipe (codis-pretrain's config and engine) on the CPU"
        config_name = config_name or "pretrain_emoji"
        nproc_per_node = nproc_per_node or 1
    launcher = launcher or ("torchrun" if gpus or nproc_per_node > 1 else CPU_LAUNCHER)
    if launcher == "inprocess" and nproc_per_node > 1:
        raise ValueError(f"launcher='inprocess' runs one process; nproc_per_node={nproc_per_node} needs "
                         f"launcher='torchrun'")
    return RunPlan(config_name, nproc_per_node, launcher, gpus, max(1, cores // nproc_per_node), found)


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
    stopped_by: str | None = None  # "timeout" when timeout_s stopped it (an interrupt raises KeyboardInterrupt)


def run_command(command: Sequence[str], log_file: str | os.PathLike, *, env: Mapping[str, str] | None = None,
                cwd: str | os.PathLike | None = None, echo: bool = True, timeout_s: float | None = None,
                tail_lines: int = 40, on_tick: Callable[[], None] | None = None, tick_s: float = 1.0,
                stop_grace_s: float = 120.0) -> CommandResult:
    """Return the CommandResult of running `command`, its output saved to `log_file` and streamed (echo).

    The command runs in a session of its own, so that a notebook's interrupt (SIGINT to the kernel's
    process group) does not reach it in the middle of a step. Instead an interrupt here sends it SIGTERM,
    which torchrun passes to its workers and the trainer answers by saving a checkpoint after the current
    step (codis_lib.train.signals); this waits for it (at most stop_grace_s, then kills the session) and
    raises KeyboardInterrupt again. Past `timeout_s` the same polite stop ends it (stopped_by "timeout").
    `on_tick` is called about every `tick_s` seconds while it runs, and once after it ended.
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stopped_by = None
    with open(log_file, "w") as log, open(log_file) as reader:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        atexit.register(_stop_politely, process, 30.0)  # a kernel shut down meanwhile takes its run along
        try:
            next_tick = started + tick_s
            while process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=min(0.5, tick_s))
                _echo(reader, echo)
                if on_tick is not None and time.perf_counter() >= next_tick:
                    on_tick()
                    next_tick = time.perf_counter() + tick_s
                if timeout_s is not None and time.perf_counter() - started > timeout_s and stopped_by is None:
                    stopped_by = "timeout"
                    print(f"[run_command] {timeout_s:.0f} s passed: asking the run to stop (SIGTERM)", flush=True)
                    _stop_politely(process, stop_grace_s)
        except KeyboardInterrupt:
            print("\n[run_command] interrupted: asking the run to save a checkpoint and stop (SIGTERM) ...", flush=True)
            try:
                _stop_politely(process, stop_grace_s)
            finally:
                _echo(reader, echo)
            raise
        finally:
            atexit.unregister(_stop_politely)
            if process.poll() is None:  # an error of our own: do not leave the run behind
                _stop_politely(process, 0.0)
        _echo(reader, echo)
    if on_tick is not None:
        on_tick()
    lines = log_file.read_text(errors="replace").splitlines(keepends=True)
    return CommandResult(returncode=process.returncode, seconds=time.perf_counter() - started, log_file=log_file,
                         tail="".join(lines[-tail_lines:]), stopped_by=stopped_by)


def _echo(reader, echo: bool) -> None:
    """Print what the command wrote to its log since the last call (when echo)."""
    text = reader.read()
    if text and echo:
        print(text, end="", flush=True)


def _stop_politely(process: subprocess.Popen, grace_s: float) -> None:
    """Send SIGTERM to `process` and wait up to grace_s seconds; then kill its whole session."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the session: torchrun and its workers
        process.wait()
