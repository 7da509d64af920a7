"""Execute a numbered notebook with papermill at CI size and return the metrics it wrote."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebook_path(name: str) -> Path:
    """Return the path of notebooks/<name>.ipynb, failing clearly when it does not exist."""
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"no notebook {path}; numbered notebooks are notebooks/NN_topic.ipynb")
    return path


def run_notebook(name: str, extra_parameters: dict | None = None, timeout_s: int = 600) -> dict:
    """Run notebooks/<name>.ipynb with size="ci" in a temporary directory; return its metrics.json.

    The executed copy stays in the temporary directory (reported in the error on failure). The
    returned dict gains `_wall_s`, the notebook's wall time, and `_executed`, the executed copy's path. `extra_parameters` may move the output
    folder (a relative `output_dir` is relative to notebooks/, where the notebook runs) and pass
    `figure_dir=None`, the notebook's own default (`<output_dir>/figures`).
    """
    import papermill as pm

    work_dir = Path(tempfile.mkdtemp(prefix=f"nb_{name}_"))
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
