"""tools/screenshot_query_box.py: what it lacks it names in one line (exit 2) before starting anything.

No browser, JupyterLab or notebook runs here: the checks come first, and each is made to fail in turn.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "screenshot_query_box.py"


def _load():
    return load_script(SCRIPT)


@pytest.fixture
def tool(tmp_path, monkeypatch):
    module = _load()
    checkpoint = tmp_path / "runs" / "pretrain_emoji" / "checkpoint_final.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not read")
    monkeypatch.setattr(module, "CHECKPOINT", checkpoint)
    started = []
    monkeypatch.setattr(module, "screenshot", lambda *args: started.append(args))  # nothing may get this far
    module.started = started
    return module


def _one_line_error(tool, capsys, argv):
    with pytest.raises(SystemExit) as stop:
        tool.main(argv)
    assert stop.value.code == 2 and not tool.started
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_missing_checkpoint_names_the_file_and_codis_pretrain(tool, capsys):
    tool.CHECKPOINT.unlink()
    line = _one_line_error(tool, capsys, ["--chromium", sys.executable])
    assert str(tool.CHECKPOINT) in line and "codis-pretrain" in line


def test_missing_playwright_says_how_to_get_it(tool, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(tool.importlib.util, "find_spec", lambda name: None if name == "playwright" else real(name))
    line = _one_line_error(tool, capsys, ["--chromium", sys.executable])
    assert "pip install playwright" in line and "apt-get install chromium" in line


def test_a_missing_chromium_or_jupyter_python_is_named(tool, capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(tool.importlib.util, "find_spec", lambda name: object() if name == "playwright" else real(name))
    line = _one_line_error(tool, capsys, ["--chromium", str(tmp_path / "no-chromium")])
    assert "--chromium" in line and "apt-get install chromium" in line
    line = _one_line_error(tool, capsys, ["--chromium", sys.executable, "--jupyter-python", str(tmp_path / "none")])
    assert "--jupyter-python" in line


def test_the_notebook_copy_is_ignored_by_git_and_the_defaults_are_the_notebook_s():
    module = _load()
    assert module.NOTEBOOK.is_file() and module.DEFAULT_OUT.parent.is_dir()
    assert module.git("rev-parse", "--git-dir") == "" or module.git("check-ignore", str(module.NOTEBOOK_DIR /
                                                                                            module.COPY_NAME))
    source = module.NOTEBOOK.read_text()
    # the box the tool types into: shown when interactive and no query, over README command 1's checkpoint
    for default in ('interactive = True', 'query = None', 'size = \\"full\\"',
                    f'checkpoint = \\"../{module.CHECKPOINT.relative_to(module.ROOT)}\\"'):
        assert default in source, default
