"""Every numbered notebook is committed clean, has one `parameters` cell and is executed by a test."""
import json
import re

import pytest

from tests.nbharness import NOTEBOOK_DIR, REPO_ROOT

pytestmark = pytest.mark.slow  # part of the notebook tier, with the tests that execute them

NOTEBOOKS = sorted(p for p in NOTEBOOK_DIR.glob("*.ipynb") if re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", p.name))


def test_there_are_numbered_notebooks():
    assert len(NOTEBOOKS) >= 2, f"expected numbered notebooks in {NOTEBOOK_DIR}"
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, len(numbers) + 1)), f"notebook numbers must run 01, 02, ... without gaps: {numbers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_with_the_standard_knobs(path):
    nb = json.loads(path.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected exactly one cell tagged 'parameters', found {len(tagged)}"
    source = "".join(tagged[0]["source"])
    for knob in ("size", "output_dir", "figure_dir"):
        assert re.search(rf"^{knob}\s*=", source, re.M), f"{path.name}: parameters cell lacks `{knob} = ...`"
    assert nb["cells"][0]["cell_type"] == "markdown", f"{path.name}: the first cell should be the title markdown"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_an_executing_test(path):
    test_file = REPO_ROOT / "tests" / f"test_nb_{path.stem}.py"
    assert test_file.exists(), f"{path.name} has no {test_file.name} that executes it with papermill"
    assert "run_notebook(" in test_file.read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_the_installed_package(path):
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "sys.path" not in code, f"{path.name} edits sys.path; import the installed codis_lib instead"
    assert "codis_lib" in code, f"{path.name} does not import codis_lib"
