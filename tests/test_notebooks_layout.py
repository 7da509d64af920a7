"""The numbered notebooks read like a course: public imports only, short cells, no helper written twice, no outputs.

Parsed, not executed (the slow tests/test_nb_*.py execute them), so this runs in the fast tier.
"""
import ast
import re
from collections import defaultdict

import nbformat
import pytest

import codis_lib
import codis_lib.viz
from tests.nbharness import NOTEBOOK_DIR

NOTEBOOKS = sorted(p for p in NOTEBOOK_DIR.glob("*.ipynb") if re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", p.name))
PUBLIC_MODULES = {"codis_lib", "codis_lib.viz"}  # the public face and the figures
MAX_CELL_LINES = 40


def _code_cells(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _trees(path):
    return [(index, ast.parse(cell.source)) for index, cell in enumerate(_code_cells(path))]


def _defined_functions(path) -> set[str]:
    return {node.name for _, tree in _trees(path) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) >= 7, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_imports_only_the_public_face_of_codis_lib(path):
    private = []
    for index, tree in _trees(path):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            private += [f"code cell {index}: {module}" for module in modules
                        if module.split(".")[0] == "codis_lib" and module not in PUBLIC_MODULES]
    assert not private, f"{path.name} imports from inside codis_lib (add the name to codis_lib._EXPORTS): {private}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_code_cells_are_at_most_40_lines(path):
    long_cells = {index: len(cell.source.splitlines()) for index, cell in enumerate(_code_cells(path))
                  if len(cell.source.splitlines()) > MAX_CELL_LINES}
    assert not long_cells, f"{path.name}: code cells longer than {MAX_CELL_LINES} lines (index: lines): {long_cells}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_without_outputs(path):
    dirty = [index for index, cell in enumerate(_code_cells(path)) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; strip them before committing"


def test_no_function_is_defined_in_two_notebooks():
    where = defaultdict(list)
    for path in NOTEBOOKS:
        for name in _defined_functions(path):
            where[name].append(path.stem)
    twice = {name: stems for name, stems in where.items() if len(stems) > 1}
    assert not twice, f"functions written in several notebooks (move them into codis_lib): {twice}"


def test_no_notebook_rewrites_a_public_function():
    public = set(codis_lib.__all__) | {name for name in dir(codis_lib.viz) if not name.startswith("_")}
    rewritten = {path.stem: sorted(_defined_functions(path) & public) for path in NOTEBOOKS}
    rewritten = {stem: names for stem, names in rewritten.items() if names}
    assert not rewritten, f"notebooks redefine what codis_lib already offers (import it instead): {rewritten}"


def test_no_six_line_block_repeats_across_the_notebooks():
    seen, repeated = {}, []
    for path in NOTEBOOKS:
        for index, cell in enumerate(_code_cells(path)):
            lines = [line.strip() for line in cell.source.splitlines()
                     if line.strip() and not line.lstrip().startswith(("import ", "from ", "#"))]
            for start in range(len(lines) - 5):
                block = "\n".join(lines[start:start + 6])
                place = (path.stem, index)
                if block in seen and seen[block] != place:
                    repeated.append((seen[block], place, lines[start]))
                seen.setdefault(block, place)
    assert not repeated, f"blocks of 6+ code lines written twice (first line shown): {repeated[:5]}"
