"""Running a notebook never changes a tracked file: its figures and outputs go under an ignored folder.

The tracked figures (docs/figures/) are written only by tools/regenerate_figures.py. The fast tests read
the notebooks' code; the slow one runs notebook 01 at CI size with its default figure folder and compares
`git status` before and after.
"""
import ast
import shutil
import subprocess

import nbformat
import pytest

from tests.nbharness import NOTEBOOK_DIR, REPO_ROOT, notebook_job, run_notebook
from tests.test_notebooks_layout import NOTEBOOKS

TRACKED_FIGURES = (REPO_ROOT / "docs" / "figures", NOTEBOOK_DIR / "figures")  # today's, and where they were
FIGURE_WRITERS = {"savefig": 0, "save_figure": 1}  # call -> index of the argument naming the file or folder


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)


def _in_git_checkout():
    return shutil.which("git") is not None and _git("rev-parse", "--git-dir").returncode == 0


def _cells(path):
    return [ast.parse(c.source) for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def _parameters(path):
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)}


def _callee(call):
    return getattr(call.func, "attr", None) or getattr(call.func, "id", None)


def _names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def test_the_tracked_figures_are_not_in_the_notebooks_folder():
    assert sorted((REPO_ROOT / "docs" / "figures").glob("0[1-6]_*.png")), "docs/figures/ holds no course figure"
    if _in_git_checkout():
        assert _git("ls-files", "notebooks/figures").stdout == ""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_string_in_a_notebook_names_the_tracked_figure_folder(path):
    nodes = [node for tree in _cells(path) for node in ast.walk(tree)]
    keys = {id(node.slice) for node in nodes if isinstance(node, ast.Subscript)}  # metrics["figures"] names no folder
    named = [node.value for node in nodes
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in keys
             and "figures" in node.value
             and any((NOTEBOOK_DIR / node.value).resolve().is_relative_to(folder) for folder in TRACKED_FIGURES)]
    assert not named, f"{path.name} names the tracked figure folder (write under figure_dir instead): {named}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_a_notebook_saves_goes_to_its_figure_dir(path):
    calls = [(node, _callee(node)) for tree in _cells(path) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    elsewhere = [ast.unparse(call) for call, name in calls
                 if name in FIGURE_WRITERS and "figure_dir" not in _names(call.args[FIGURE_WRITERS[name]])]
    assert not elsewhere, f"{path.name} saves figures outside figure_dir: {elsewhere}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_default_output_and_figure_folders_are_ignored_by_git(path):
    defaults = _parameters(path)
    assert defaults.get("figure_dir", "missing") is None, f"{path.name}: figure_dir should default to None"
    output_dir = NOTEBOOK_DIR / defaults["output_dir"]
    if not _in_git_checkout():
        pytest.skip("not a git checkout")
    for folder in (output_dir, output_dir / "figures"):
        relative = folder.resolve().relative_to(REPO_ROOT)
        assert _git("check-ignore", "-q", f"{relative}/x.png").returncode == 0, f"{path.name}: {relative} not ignored"


def _run_01_in_its_own_folder() -> tuple[dict, list[str], str, str]:
    """Run notebook 01 into its default (ignored) folders; return its metrics, figures and git status around it."""
    output_dir = "outputs/_test_git_status_01"  # in the notebook's own ignored folder; not the reading run's
    shutil.rmtree(NOTEBOOK_DIR / output_dir, ignore_errors=True)
    before = _git("status", "--porcelain").stdout
    try:
        metrics = run_notebook("01_optimal_transport", {"output_dir": output_dir, "figure_dir": None})
        figures = sorted(p.name for p in (NOTEBOOK_DIR / output_dir / "figures").glob("01_*.png"))
        after = _git("status", "--porcelain").stdout
    finally:
        shutil.rmtree(NOTEBOOK_DIR / output_dir, ignore_errors=True)
    return metrics, figures, before, after


RUN = notebook_job(__name__, "test_running_a_notebook_leaves_git_status_unchanged",
                   lambda: _run_01_in_its_own_folder() if _in_git_checkout() else None)


@pytest.mark.slow  # executes a notebook with papermill (about 20 s)
def test_running_a_notebook_leaves_git_status_unchanged():
    if not _in_git_checkout():
        pytest.skip("not a git checkout")
    metrics, figures, before, after = RUN.result()
    assert metrics["n_codes"] > 0 and len(figures) >= 3, figures  # it ran and drew into <output_dir>/figures
    assert after == before, f"running notebook 01 changed the checkout:\nbefore:\n{before}\nafter:\n{after}"
