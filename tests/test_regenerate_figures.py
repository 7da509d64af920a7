"""tools/regenerate_figures.py: it copies a reading-size run's figures pixel for pixel, stamped with command and commit.

A fake repository in tmp_path holds one notebook and its run (made with the real `start_notebook`), so
nothing here executes a notebook or touches docs/figures/.
"""
import json
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from codis_lib import start_notebook
from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "regenerate_figures.py"


@pytest.fixture
def tool(tmp_path, monkeypatch):
    module = load_script(SCRIPT)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "NOTEBOOK_DIR", tmp_path / "notebooks")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell('size = "full"\noutput_dir = "outputs/05"\nfigure_dir = None',
                                                metadata={"tags": ["parameters"]})]
    (tmp_path / "notebooks").mkdir()
    nbformat.write(notebook, tmp_path / "notebooks" / "05_demo.ipynb")
    return module


def _run(tmp_path, size, checkpoint="../runs/pretrain_emoji/checkpoint_final.pt"):
    run = start_notebook(size, tmp_path / "notebooks" / "outputs" / "05")
    pixels = np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(run.figure_dir / "05_made.png")
    old = run.figure_dir / "05_old.png"
    Image.fromarray(pixels).save(old)
    os.utime(old, (0, 0))  # written long before this run
    (run.output_dir / "metrics.json").write_text(json.dumps({"checkpoint": checkpoint, "checkpoint_step": 7}))
    return pixels


def test_a_full_run_s_new_figures_are_copied_with_command_and_commit(tool, tmp_path):
    pixels = _run(tmp_path, "full")
    out = tmp_path / "docs" / "figures"
    written = tool.regenerate(["05"], from_runs=True, any_checkpoint=False, command="python tools/x.py --from-runs",
                              figure_dir=out)
    assert written == [out / "05_made.png"] and not (out / "05_old.png").exists()  # the older file is left out
    with Image.open(out / "05_made.png") as image:
        assert np.array_equal(np.asarray(image), pixels)
        text = image.text
    record = json.loads((tmp_path / "notebooks" / "outputs" / "05" / "notebook_run.json").read_text())
    assert text["Command"] == "python tools/x.py --from-runs"
    assert text["Commit"].startswith(record["commit"]) and len(record["commit"]) == 40
    assert text["Notebook"] == "notebooks/05_demo.ipynb (size full)"
    assert text["Checkpoint"] == "../runs/pretrain_emoji/checkpoint_final.pt (7 steps)"
    assert record["started_at"] in text["Run"]


def test_a_ci_run_or_another_checkpoint_is_refused_naming_the_file(tool, tmp_path):
    _run(tmp_path, "ci")
    with pytest.raises(SystemExit, match=r"notebook_run.json: a size='ci' run"):
        tool.regenerate(["05"], from_runs=True, any_checkpoint=False, command="c", figure_dir=tmp_path / "f")
    _run(tmp_path, "full", checkpoint="outputs/04/checkpoint_final.pt")
    with pytest.raises(SystemExit, match=r"metrics.json: scored outputs/04/checkpoint_final.pt"):
        tool.regenerate(["05"], from_runs=True, any_checkpoint=False, command="c", figure_dir=tmp_path / "f")
    assert not (tmp_path / "f").exists()
    assert tool.regenerate(["05"], from_runs=True, any_checkpoint=True, command="c", figure_dir=tmp_path / "f")
    with pytest.raises(SystemExit, match=r"--notebooks 09"):
        tool.regenerate(["09"], from_runs=True, any_checkpoint=False, command="c", figure_dir=tmp_path / "f")


def test_the_real_notebooks_default_to_folders_the_tool_reads():
    module = load_script(SCRIPT)
    for number in module.WITH_FIGURES:
        folder = module.run_folder(module.notebook_file(number))
        assert folder == (module.NOTEBOOK_DIR / "outputs" / number).resolve(), number
