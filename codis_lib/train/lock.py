"""The run-folder lock: one training process (rank 0 of a run) owns `train.output_dir` for the whole run.

    <output_dir>/.run.lock     {"pid": 4242, "host": "node7", "start": 123456789, "since": "2025-..."}

`RunLock.acquire` opens the lock file and takes an exclusive `flock` on it, held until `release` (or
until the process dies: the kernel drops the lock of a killed process, so a lock is stale exactly
when its owner is gone). The file records who holds it, for the refusal: one line naming the folder
and the owner's pid. A file left by a killed run is taken over with a warning. Where the file system
has no flock (some cluster file systems), the owner is checked by pid instead: on this host, a process
with that pid and start time (Linux `/proc/<pid>/stat`, which tells a reused pid apart) still running;
a lock from another host cannot be checked there and is refused as live, naming the file to delete.

Pure standard library, so that a process can take or test the lock without importing torch.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "RunFolderLockedError", "RunLock", "pid_alive", "process_start_time"]

LOCK_NAME = ".run.lock"


class RunFolderLockedError(FileExistsError):
    """Another live process holds the run folder; `.owner` is its lock record (pid, host, start, since)."""

    def __init__(self, message: str, owner: dict):
        super().__init__(message)
        self.owner = owner


def process_start_time(pid: int) -> int | None:
    """Return the start time of process `pid` in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[19]) if len(fields) > 19 else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Return True when process `pid` runs on this host (and, when `start` is given and known, started then)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    if start is not None:
        now = process_start_time(pid)
        return now is None or now == start
    return True


class RunLock:
    """The lock of one run folder; `acquire` it before touching the folder, `release` it at the end."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start_time(os.getpid())}
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _owner(self) -> dict:
        """Return the lock record on disk ({} when there is none or it is unreadable)."""
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _pid_owner_live(self, owner: dict) -> bool:
        """Return whether the recorded owner still runs (the check where flock is not available)."""
        if not owner or owner.get("pid") == self.record["pid"] and owner.get("host") == self.record["host"]:
            return False
        if owner.get("host") != self.record["host"]:
            return True  # cannot be checked from here
        return pid_alive(int(owner.get("pid", -1)), owner.get("start"))

    def _refuse(self, owner: dict) -> RunFolderLockedError:
        host = owner.get("host", "?")
        hint = f" (if that process is gone, delete {self.path})" if host != self.record["host"] else ""
        return RunFolderLockedError(
            f"{self.output_dir} is in use by a running training process (pid {owner.get('pid', '?')} on {host}, "
            f"since {owner.get('since', '?')}); wait for it to finish, stop it, or pick another --output-dir{hint}",
            owner)

    def _try_lock(self, fd: int) -> bool | None:
        """Return True when the flock was taken, False when another process holds it, None without flock support."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return None

    def acquire(self, log=print) -> "RunLock":
        """Return self holding the folder's lock; raise RunFolderLockedError if a live process holds it.

        Creates the folder (an unwritable place raises PermissionError / OSError naming it).
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            locked = self._try_lock(fd)
            owner = self._owner()
            if locked is False or (locked is None and self._pid_owner_live(owner)):
                os.close(fd)
                raise self._refuse(owner)
            try:  # the file we locked may have been deleted by its releasing owner meanwhile: then lock anew
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if owner.get("pid") is not None:
            log(f"[codis] taking over the stale lock of {self.output_dir} (pid {owner.get('pid')} on "
                f"{owner.get('host', '?')}, since {owner.get('since', '?')}, is gone)")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({**self.record, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        except OSError as error:  # a full disk or quota: no empty lock file left behind, and the file named
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise OSError(f"cannot write the run lock {self.path}: {error.strerror or error}; free some space "
                          f"there or pick another --output-dir") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Delete the lock file and drop the lock, if this process holds it."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
