"""Execute a numbered notebook with papermill at CI size and return the metrics it wrote.

`run_notebook` runs one notebook now. The notebook tests declare their runs instead with `notebook_job`
when their module is imported; the first test that asks for a result starts every job whose test was
collected, `notebook_jobs()` at a time (two at CI size), in the order they were declared. A CI-size kernel
trains on one thread, so on a 2-core machine the second core would otherwise wait while pytest waits for
the kernel. Each job still runs every cell of its notebook; a job's exception is raised in its test.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebook_path(name: str) -> Path:
    """Return the path of notebooks/<name>.ipynb, failing clearly when it does not exist."""
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"no notebook {path}; numbered notebooks are notebooks/NN_topic.ipynb")
    return path


_WORK_DIRS: list[Path] = []  # the temporary folders of this session's notebook runs (about 90 MB each)


def notebook_work_dir(prefix: str) -> Path:
    """Return a new temporary folder for a notebook run, removed by `remove_work_dirs` at the session's end."""
    work_dir = Path(tempfile.mkdtemp(prefix=prefix))
    _WORK_DIRS.append(work_dir)
    return work_dir


def remove_work_dirs() -> int:
    """Delete the session's notebook folders (conftest calls it when every test passed); return how many."""
    removed = 0
    while _WORK_DIRS:
        shutil.rmtree(_WORK_DIRS.pop(), ignore_errors=True)
        removed += 1
    return removed


def run_notebook(name: str, extra_parameters: dict | None = None, timeout_s: int = 600) -> dict:
    """Run notebooks/<name>.ipynb with size="ci" in a temporary directory; return its metrics.json.

    The executed copy stays in the temporary directory (reported in the error on failure), which is
    deleted at the end of a session in which every test passed (tests/conftest.py). The
    returned dict gains `_wall_s`, the notebook's wall time, and `_executed`, the executed copy's path. `extra_parameters` may move the output
    folder (a relative `output_dir` is relative to notebooks/, where the notebook runs) and pass
    `figure_dir=None`, the notebook's own default (`<output_dir>/figures`).
    """
    import papermill as pm

    work_dir = notebook_work_dir(f"nb_{name}_")
    output_dir = work_dir / "outputs"
    parameters = {"size": "ci", "output_dir": str(output_dir), "figure_dir": str(work_dir / "figures")}
    parameters.update(extra_parameters or {})
    output_dir = NOTEBOOK_DIR / parameters["output_dir"]  # an absolute output_dir stays as it is
    executed = work_dir / f"{name}.executed.ipynb"
    start = time.perf_counter()
    pm.execute_notebook(str(notebook_path(name)), str(executed), parameters=parameters, cwd=str(NOTEBOOK_DIR),
                        kernel_name="python3", progress_bar=False, execution_timeout=timeout_s)
    wall = time.perf_counter() - start
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.exists():
        raise AssertionError(f"{name} ran but wrote no {metrics_file} (executed copy: {executed})")
    metrics = json.loads(metrics_file.read_text())
    metrics["_wall_s"] = wall
    metrics["_executed"] = str(executed)  # the executed copy, for tests that read what the notebook printed
    return metrics


JOBS_VARIABLE = "CODIS_NOTEBOOK_JOBS"  # notebook runs at a time; unset: 2 at CI size, 1 at the reading size


def notebook_jobs(size: str) -> int:
    """Return how many notebook jobs run at a time: $CODIS_NOTEBOOK_JOBS, else 2 at size "ci" and 1 otherwise.

    A reading-size notebook trains on every core it finds, so two of them would only share the cores.
    """
    value = os.environ.get(JOBS_VARIABLE)
    if value is None:
        return 2 if size == "ci" else 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{JOBS_VARIABLE}={value!r}: expected a whole number of notebook runs, 1 or more")
    return int(value)


@dataclass
class NotebookJob:
    """One or more notebook runs that a test asserts on, started ahead of the test by its pool."""

    module: str  # the test module that declared it (its __name__)
    tests: tuple[str, ...]  # the test functions there that read its result
    run: Callable[[], Any]
    pool: "NotebookJobPool" = field(repr=False)
    wanted: bool = False  # a test that reads it was collected
    future: Future | None = field(default=None, repr=False)

    def result(self) -> Any:
        """Return the job's result (raising its exception), starting the pool's jobs first if need be."""
        self.pool.start()
        if self.future is None:  # its test was not collected (called from elsewhere): run it here and now
            self.future = Future()
            try:
                self.future.set_result(self.run())
            except BaseException as error:  # noqa: BLE001 (kept, and raised below in the caller)
                self.future.set_exception(error)
        return self.future.result()


class NotebookJobPool:
    """The declared jobs, run `workers` at a time in threads (each papermill kernel is its own process)."""

    def __init__(self) -> None:
        self.jobs: list[NotebookJob] = []
        self.workers = 1
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def declare(self, module: str, tests: str | Iterable[str], run: Callable[[], Any]) -> NotebookJob:
        """Add a job: `run` for the test function(s) `tests` of `module`."""
        job = NotebookJob(module, (tests,) if isinstance(tests, str) else tuple(tests), run, self)
        self.jobs.append(job)
        return job

    def select(self, collected: Iterable[tuple[str, str]], workers: int) -> None:
        """Mark the jobs whose tests were collected, given (module name, test function name) pairs."""
        collected = set(collected)
        for job in self.jobs:
            job.wanted = any((job.module, test) in collected for test in job.tests)
        self.workers = workers

    def start(self) -> None:
        """Submit every wanted job not yet started, in the order declared (once; later calls do nothing)."""
        with self._lock:
            if self._executor is not None:
                return
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="notebook")
            for job in self.jobs:
                if job.wanted and job.future is None:
                    job.future = self._executor.submit(job.run)

    def shutdown(self) -> None:
        """Cancel the jobs not yet started and wait for the running ones."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


POOL = NotebookJobPool()  # the test session's jobs (tests/conftest.py selects, starts on first use, shuts down)


def notebook_job(module: str, tests: str | Iterable[str], run: Callable[[], Any]) -> NotebookJob:
    """Declare a job of the session's pool: `run` (e.g. a lambda calling run_notebook) for `tests` of `module`."""
    return POOL.declare(module, tests, run)
