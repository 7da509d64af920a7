"""The run-folder lock (issue case 3) and the run's start and stop (issue case 12): refusals, takeover, SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codis_lib.checkpoint import list_checkpoints, load_checkpoint
from codis_lib.train.cli import pretrain_main
from tests.helpers import tiny_run_overrides

REPO = Path(__file__).resolve().parents[1]


def _cli(overrides, *flags):
    argv = [item for value in overrides for item in ("--set", value)]
    return pretrain_main(argv + list(flags))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Start a process that takes the folder's lock and sleeps; return it once it holds the lock."""
    code = ("import sys, time; from codis_lib.train.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    return holder


# ------------------------------------------------------------------------------------------ case 3
def test_a_second_run_into_a_live_folder_is_refused_and_a_dead_owner_is_taken_over(tmp_path, capsys):
    """issue case 3: fresh, overwrite and --resume runs into a live run's folder are refused naming folder and pid."""
    out = tmp_path / "run"
    overrides = tiny_run_overrides(out, 2)
    assert _cli(overrides, "--stop-at-step", "1") == 0
    assert not (out / ".run.lock").exists()  # released at the end of the run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    holder = _hold_lock(out)
    try:
        capsys.readouterr()
        for flags, extra in (((), []), ((), ["train.overwrite=true"]), (("--resume",), [])):
            assert _cli(overrides + extra, *flags) == 2
            error = capsys.readouterr().err.strip()
            assert len(error.splitlines()) == 1
            assert f"{out} is in use by a running training process (pid {holder.pid} on " in error
        after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".run.lock"}
        assert after == before  # nothing deleted, nothing rewritten
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".run.lock").exists()  # left by the killed owner: stale
    assert _cli(overrides, "--resume") == 0
    assert "taking over the stale lock" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint_final.pt")["step"] == 2 and not (out / ".run.lock").exists()


def test_a_lock_of_a_gone_process_is_stale_without_flock(tmp_path, monkeypatch):
    """issue case 3: where flock is unavailable, the pid (and its start time) decide; a reused pid is not the owner."""
    import json

    from codis_lib.train import lock as lock_module

    monkeypatch.setattr(lock_module.RunLock, "_try_lock", lambda self, fd: None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / ".run.lock"
    path.write_text(json.dumps({"pid": gone.pid, "host": lock_module.socket.gethostname(), "start": 1}))
    lines = []
    lock_module.RunLock(tmp_path).acquire(log=lines.append).release()
    assert len(lines) == 1 and "stale lock" in lines[0]
    parent = os.getppid()  # alive, but started at another time than the record says: a reused pid
    path.write_text(json.dumps({"pid": parent, "host": lock_module.socket.gethostname(), "start": 1}))
    lock_module.RunLock(tmp_path).acquire(log=lines.append).release()
    start = lock_module.process_start_time(parent)
    path.write_text(json.dumps({"pid": parent, "host": lock_module.socket.gethostname(), "start": start}))
    with pytest.raises(lock_module.RunFolderLockedError, match=f"pid {parent} on"):
        lock_module.RunLock(tmp_path).acquire()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(lock_module.RunFolderLockedError, match=r"on elsewhere.*delete .*\.run\.lock"):
        lock_module.RunLock(tmp_path).acquire()


# ------------------------------------------------------------------------------------------ case 12
def test_resume_without_a_checkpoint_is_one_clear_refusal(tmp_path, capsys):
    """issue case 12: --resume with no checkpoint says so and exits 2 (no "starting from scratch", no run)."""
    out = tmp_path / "run"
    assert _cli(tiny_run_overrides(out, 2), "--resume") == 2
    captured = capsys.readouterr()
    assert "from scratch" not in captured.out and list_checkpoints(out) == []
    assert captured.err.strip() == f"codis-pretrain: --resume: no checkpoint_*.pt in {out} to resume from; start " \
                                   f"the run without --resume"


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_stop_at_step_must_be_a_positive_step(tmp_path, capsys, value):
    """issue case 12: --stop-at-step 0, negatives and non-numbers are refused in one line, exit 2."""
    with pytest.raises(SystemExit) as info:
        _cli(tiny_run_overrides(tmp_path / "run", 2), "--stop-at-step", value)
    assert info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--stop-at-step" in error and not (tmp_path / "run").exists()
    from codis_lib.config import ConfigError
    from codis_lib.run_config import load_run_config
    from codis_lib.train.engine import train

    if value != "x":
        with pytest.raises(ConfigError, match="must be >= 1"):
            train(load_run_config("pretrain_emoji", overrides=tiny_run_overrides(tmp_path / "run", 2)),
                  stop_at_step=int(value))


def test_temporary_files_of_dead_writers_are_removed_at_start(tmp_path, capsys):
    """issue case 12: .checkpoint_*.tmp-PID files of processes that are gone are deleted; a live writer's stay."""
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = [out / f".checkpoint_00000003.pt.tmp-{gone.pid}", out / f".checkpoint_final.pt.tmp-{gone.pid}"]
    live = out / f".checkpoint_00000004.pt.tmp-{os.getpid()}"
    for path in dead + [live]:
        path.write_bytes(b"partial")
    assert _cli(tiny_run_overrides(out, 1)) == 0
    assert not any(p.exists() for p in dead) and live.exists()
    assert "removed 2 temporary file(s) of killed checkpoint writes" in capsys.readouterr().out


@pytest.mark.slow  # a CLI subprocess (imports, start-up) stopped by a real signal
def test_sigterm_saves_a_checkpoint_at_the_next_step_and_exits_cleanly(tmp_path):
    """issue case 12: SIGTERM mid-run writes the checkpoint of the step it ends on and exits 0 (not 143)."""
    out = tmp_path / "run"
    argv = [item for value in tiny_run_overrides(out, 30) for item in ("--set", value)]
    process = subprocess.Popen([sys.executable, "-m", "codis_lib.train.cli", "pretrain", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1 and not (out / "checkpoint_final.pt").exists()
    step = load_checkpoint(checkpoints[0])["step"]
    assert 2 <= step < 30 and f"stopped on SIGTERM after step {step}, checkpoint saved" in stdout
    assert not (out / ".run.lock").exists()
