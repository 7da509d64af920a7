"""The notebook tests' job pool (tests/nbharness.py): what runs ahead, how many at once, and what a test gets back."""
import threading
import time

import pytest

from tests.nbharness import JOBS_VARIABLE, NotebookJobPool, notebook_jobs


class Recorder:
    """Jobs that note when they start and finish, and how many run at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started, self.running, self.most = [], 0, 0

    def job(self, name, seconds=0.05, error=None):
        def run():
            with self.lock:
                self.started.append(name)
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(seconds)
            with self.lock:
                self.running -= 1
            if error is not None:
                raise error
            return name
        return run


def test_the_collected_jobs_start_in_order_at_most_workers_at_a_time():
    pool, record = NotebookJobPool(), Recorder()
    jobs = [pool.declare("tests.m", f"test_{i}", record.job(i, seconds=0.1)) for i in range(5)]
    pool.select([("tests.m", f"test_{i}") for i in range(5)], workers=2)
    try:
        assert jobs[0].result() == 0  # the first result starts them all
        assert [job.result() for job in jobs] == list(range(5))
    finally:
        pool.shutdown()
    assert record.started == list(range(5)) and record.most == 2


def test_a_job_whose_test_was_not_collected_runs_only_when_asked():
    pool, record = NotebookJobPool(), Recorder()
    wanted = pool.declare("tests.m", ("test_a", "test_b"), record.job("wanted"))  # read by two tests
    other = pool.declare("tests.m", "test_c", record.job("other"))
    pool.select([("tests.m", "test_b"), ("tests.other", "test_c")], workers=2)  # test_c of another module
    try:
        assert wanted.wanted and not other.wanted
        assert wanted.result() == "wanted" and wanted.result() == "wanted"  # run once, read twice
        assert record.started == ["wanted"]
        assert other.result() == "other" and record.started == ["wanted", "other"]
    finally:
        pool.shutdown()


def test_a_failed_job_raises_its_error_in_the_test_that_reads_it():
    pool = NotebookJobPool()
    failing = pool.declare("tests.m", "test_x", Recorder().job("x", error=AssertionError("cell 7 failed")))
    fine = pool.declare("tests.m", "test_y", Recorder().job("y"))
    pool.select([("tests.m", "test_x"), ("tests.m", "test_y")], workers=1)
    try:
        with pytest.raises(AssertionError, match="cell 7 failed"):
            failing.result()
        assert fine.result() == "y"  # the next job still ran
    finally:
        pool.shutdown()


def test_shutting_down_cancels_the_jobs_not_yet_started():
    pool, record = NotebookJobPool(), Recorder()
    jobs = [pool.declare("tests.m", f"test_{i}", record.job(i, seconds=0.2)) for i in range(4)]
    pool.select([("tests.m", f"test_{i}") for i in range(4)], workers=1)
    pool.start()
    time.sleep(0.05)
    pool.shutdown()  # the first is running: it finishes; the other three never start
    assert record.started == [0] and jobs[0].future.done() and all(job.future.cancelled() for job in jobs[1:])


def test_how_many_notebooks_run_at_once(monkeypatch):
    monkeypatch.delenv(JOBS_VARIABLE, raising=False)
    assert notebook_jobs("ci") == 2 and notebook_jobs("full") == 1  # full size trains on every core itself
    monkeypatch.setenv(JOBS_VARIABLE, "1")
    assert notebook_jobs("ci") == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(JOBS_VARIABLE, bad)
        with pytest.raises(ValueError, match=JOBS_VARIABLE):
            notebook_jobs("ci")


def test_the_notebook_folders_are_removed_only_when_asked(monkeypatch):
    import tests.nbharness as harness

    monkeypatch.setattr(harness, "_WORK_DIRS", [])  # this session's real folders stay out of it
    folders = [harness.notebook_work_dir("nb_test_") for _ in range(2)]
    (folders[0] / "executed.ipynb").write_text("{}")
    assert all(folder.is_dir() for folder in folders)
    assert harness.remove_work_dirs() == 2
    assert not any(folder.exists() for folder in folders) and harness._WORK_DIRS == []
