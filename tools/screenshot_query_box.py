"""Check notebook 05's query box in a real browser: JupyterLab in headless Chromium, driven by Playwright.

    python tools/screenshot_query_box.py                  # types "cat", writes docs/figures/05_query_box_jupyterlab.png
    python tools/screenshot_query_box.py --query "red heart" --out /tmp/box.png

It starts JupyterLab on a free localhost port (a random token, settings and workspaces in a temporary folder)
in notebooks/, opens a copy of notebooks/05_retrieval_evaluation.ipynb with its own parameters (size "full",
the query box as widgets, README command 1's checkpoint), runs all cells with JupyterLab's "Run All Cells"
command, types the query into the box's caption field, presses Enter, waits for the new top images and saves
a screenshot of the caption field and its images. The copy, `notebooks/screenshot_query_box.executed.ipynb`,
is ignored by git, never saved by JupyterLab (autosave off) and deleted at the end, so no tracked file changes
except `--out`; the notebook writes its outputs to notebooks/outputs/05 as any run of it does. JupyterLab, its
kernel and the browser are stopped at the end, also on failure. It takes the notebook's own run time plus
about half a minute (13.6 minutes in all on 2 cores shared with three other jobs, 13.0 of them the notebook).

The PNG records in its text chunks the command line, the git commit the notebook ran at ("+changes" when
tracked files differed), the checkpoint it scored, the query and the browser: `PIL.Image.open(path).text`.

Needs, besides README command 1's checkpoint: Playwright's Python package in the Python that runs this tool
(`pip install playwright`), a Chromium (`apt-get install chromium`, or `python -m playwright install chromium`),
and JupyterLab with ipywidgets in the Python that runs the notebook (`--jupyter-python`, default: this one).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOK = NOTEBOOK_DIR / "05_retrieval_evaluation.ipynb"
COPY_NAME = "screenshot_query_box.executed.ipynb"  # git ignores notebooks/*.executed.ipynb
CHECKPOINT = ROOT / "runs" / "pretrain_emoji" / "checkpoint_final.pt"  # README command 1; the notebook's default
RUN_FOLDER = NOTEBOOK_DIR / "outputs" / "05"  # the notebook's default output_dir
DEFAULT_OUT = ROOT / "docs" / "figures" / "05_query_box_jupyterlab.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# JupyterLab user settings: every cell stays in the page (no windowing), no autosave, no news pop-up
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}
# copies a PNG (argv 1 -> argv 2) adding text chunks (argv 3, JSON): run in the project's Python, which has Pillow
STAMP = ("import json, sys\nfrom PIL import Image\nfrom PIL.PngImagePlugin import PngInfo\ninfo = PngInfo()\n"
         "for key, value in json.loads(sys.argv[3]).items():\n    info.add_text(key, value)\n"
         "Image.open(sys.argv[1]).save(sys.argv[2], pnginfo=info)")
# state of the run, read in the page: code cells queued or running ("[*]"), executed, and whether the box is there
PAGE_STATE = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  return {busy: prompts.filter(p => p.startsWith('[*]')).length, done: prompts.filter(p => /\\[\\d+\\]/.test(p)).length,
          cells: prompts.length, box: document.querySelector('.widget-vbox .widget-text input') !== null};
}"""


def fail(message: str) -> None:
    """Exit with status 2 and one line on stderr."""
    print(f"screenshot_query_box.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def find_chromium(given: str | None) -> str | None:
    """Return the Chromium to run: `given`, else the first of CHROMIUM_NAMES on PATH (None: Playwright's own)."""
    if given:
        found = shutil.which(given)
        if found is None:
            fail(f"--chromium {given}: no such executable (apt-get install chromium)")
        return found
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def preflight(jupyter_python: str, chromium: str | None) -> None:
    """Exit (status 2, one line) naming what is missing: the checkpoint, Playwright, JupyterLab."""
    if not CHECKPOINT.is_file():
        fail(f"{CHECKPOINT}: missing; run codis-pretrain first (README command 1), the query box scores its model")
    if importlib.util.find_spec("playwright") is None:
        fail(f"no Playwright in {sys.executable}: pip install playwright (and a Chromium: apt-get install chromium)")
    if shutil.which(jupyter_python) is None:
        fail(f"--jupyter-python {jupyter_python}: no such executable")
    check = subprocess.run([jupyter_python, "-c", "import jupyterlab, ipywidgets, ipykernel"], capture_output=True)
    if check.returncode != 0:
        fail(f"--jupyter-python {jupyter_python}: needs JupyterLab, ipywidgets and ipykernel "
             f"(pip install jupyterlab ipywidgets)")
    if chromium is None and importlib.util.find_spec("playwright") is not None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            if not Path(playwright.chromium.executable_path).is_file():
                fail("no Chromium found: apt-get install chromium (or python -m playwright install chromium), "
                     "or pass --chromium PATH")


def free_port() -> int:
    """Return a localhost TCP port that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def git(*args: str) -> str:
    """Return git's stdout in ROOT ("" outside a git checkout)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def start_lab(jupyter_python: str, temp: Path, port: int, token: str) -> subprocess.Popen:
    """Start JupyterLab in notebooks/ (settings, runtime files and log in `temp`); return its process."""
    for name, values in LAB_SETTINGS.items():
        (temp / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (temp / "settings" / name).write_text(json.dumps(values))
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(temp / "runtime"), "JUPYTER_CONFIG_DIR": str(temp / "config"),
           # the kernel imports this checkout's codis_lib, and records its commit
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [jupyter_python, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={NOTEBOOK_DIR}",
               "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={temp / 'settings'}",
               f"--LabApp.workspaces_dir={temp / 'workspaces'}", *(["--allow-root"] if os.geteuid() == 0 else [])]
    with open(temp / "jupyterlab.log", "wb") as log:
        lab = subprocess.Popen(command, cwd=NOTEBOOK_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if lab.poll() is not None:
            log_tail = (temp / "jupyterlab.log").read_text(errors="replace").strip().splitlines()[-1:]
            fail(f"JupyterLab exited with status {lab.returncode} at start: {' '.join(log_tail)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5):
                return lab
        except OSError:
            time.sleep(1)
    stop_lab(lab, port, token)
    fail(f"JupyterLab did not answer on port {port} within 180 s (log: {temp / 'jupyterlab.log'})")


def descendants(pid: int) -> list[int]:
    """Return the ids of the processes below `pid` (children first), read from /proc ([] without /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def stop_lab(lab: subprocess.Popen, port: int, token: str) -> None:
    """Shut JupyterLab and its kernels down through its API; kill by id whatever is left after 30 s."""
    below = descendants(lab.pid)  # the kernel runs in its own session: end it by its id, not by group
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/shutdown", method="POST",
                                     headers={"Authorization": f"token {token}"})
    try:
        urllib.request.urlopen(request, timeout=10).close()
        lab.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        lab.kill()
        lab.wait()
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already ended with the server


def run_all_and_wait(page, minutes: float) -> None:
    """Run every cell with JupyterLab's "Run All Cells" command; return once the box is shown and no cell runs."""
    page.wait_for_function("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                           " return w && w.sessionContext && w.sessionContext.session"
                           " && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle'; }",
                           timeout=180_000)
    # the command's promise settles when the last cell has run: start it without waiting for it
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    started, reported, deadline = time.monotonic(), 0.0, time.monotonic() + 60 * minutes
    page.wait_for_function(f"() => {{ const s = ({PAGE_STATE})(); return s.busy + s.done > 0; }}", timeout=60_000)
    while time.monotonic() < deadline:
        state = page.evaluate(PAGE_STATE)
        if state["busy"] == 0:
            if not state["box"]:
                fail(f"the run stopped after {state['done']} of {state['cells']} code cells without showing the "
                     f"query box (an error in a cell? run the notebook with papermill to see it)")
            return
        if time.monotonic() - reported >= 30:
            reported = time.monotonic()
            print(f"  {time.monotonic() - started:5.0f} s: {state['done']} of {state['cells']} code cells run", flush=True)
        time.sleep(2)
    fail(f"the notebook was still running after {minutes:g} minutes (--minutes)")


def ask_box(page, query: str):
    """Type `query` into the caption field, press Enter, wait for its images; return the region to capture."""
    box = page.locator(".widget-vbox").filter(has=page.locator(".widget-text input")).first
    field, results = box.locator(".widget-text").first, box.locator(".widget-output").first
    field.scroll_into_view_if_needed()
    before = results.locator("img").first.get_attribute("src", timeout=60_000)
    field.locator("input").fill(query)
    field.locator("input").press("Enter")
    page.wait_for_function("([output, old]) => { const img = output.querySelector('img');"
                           " return img && img.getAttribute('src') !== old && img.complete && img.naturalWidth > 0; }",
                           arg=[results.element_handle(), before], timeout=300_000)
    page.wait_for_timeout(500)  # let the output area settle its height
    field.evaluate("element => element.scrollIntoView({block: 'center'})")  # below the toolbar, images in view
    top, bottom = field.bounding_box(), results.bounding_box()
    left, upper = max(min(top["x"], bottom["x"]) - 8, 0), max(top["y"] - 4, 0)
    right = max(top["x"] + top["width"], bottom["x"] + bottom["width"]) + 8
    return {"x": left, "y": upper, "width": right - left, "height": bottom["y"] + bottom["height"] + 2 - upper}


def browse(url: str, chromium: str | None, query: str, minutes: float) -> tuple[bytes, str]:
    """Open `url` in headless Chromium, run the notebook, ask the box; return (the PNG, the browser's version)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1600})
            page.goto(url, timeout=180_000)
            run_all_and_wait(page, minutes)
            print(f"typing {query!r} into the caption field", flush=True)
            region = ask_box(page, query)
            return page.screenshot(clip=region), f"Chromium {browser.version}"
        finally:
            browser.close()


def run_checkpoint(since: float) -> str:
    """Return the checkpoint the notebook scored in this run, with its steps, from its metrics.json."""
    record, metrics = RUN_FOLDER / "notebook_run.json", RUN_FOLDER / "metrics.json"
    if not metrics.is_file() or metrics.stat().st_mtime < since or not record.is_file():
        fail(f"{metrics}: not written by this run; the notebook did not reach its last cell")
    values = json.loads(metrics.read_text())
    if not str(values.get("checkpoint", "")).endswith("runs/pretrain_emoji/checkpoint_final.pt"):
        fail(f"{metrics}: the run scored {values.get('checkpoint')}, not README command 1's {CHECKPOINT}")
    return f"{values['checkpoint']} ({values.get('checkpoint_step', '?')} steps)"


def save_png(shot: bytes, out: Path, text: dict[str, str], python: str) -> None:
    """Write the screenshot to `out` with `text` as PNG text chunks, by Pillow in `python` (the project's Python)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="query_box_png_") as temp:
        raw = Path(temp) / "shot.png"
        raw.write_bytes(shot)
        done = subprocess.run([python, "-c", STAMP, str(raw), str(out), json.dumps(text)], capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"--out {out}: Pillow in {python} could not write it: {done.stderr.strip().splitlines()[-1:]}")


def screenshot(query: str, out: Path, jupyter_python: str, chromium: str | None, minutes: float,
               command: str) -> dict[str, str]:
    """Run notebook 05 in JupyterLab, ask its box `query`, save the screenshot; return its text chunks."""
    copy = NOTEBOOK_DIR / COPY_NAME
    if copy.exists():
        fail(f"{copy}: exists (another run of this tool?); delete it first")
    tracked_before = git("status", "--porcelain", "--untracked-files=no")
    checkpoints_dir = NOTEBOOK_DIR / ".ipynb_checkpoints"
    checkpoints_before = set(checkpoints_dir.glob("*")) if checkpoints_dir.is_dir() else None
    port, token, since = free_port(), secrets.token_hex(16), time.time()
    shutil.copyfile(NOTEBOOK, copy)
    try:
        if git("rev-parse", "--git-dir") and not git("check-ignore", str(copy)):
            fail(f"{copy}: not ignored by git; .gitignore must hold notebooks/*.executed.ipynb")
        with tempfile.TemporaryDirectory(prefix="query_box_lab_") as temp:
            lab = start_lab(jupyter_python, Path(temp), port, token)
            print(f"JupyterLab on port {port}; running all cells of {NOTEBOOK.name} (a copy)", flush=True)
            try:
                shot, browser = browse(f"http://127.0.0.1:{port}/lab/tree/{COPY_NAME}?token={token}",
                                       chromium, query, minutes)
            finally:
                stop_lab(lab, port, token)
    finally:
        copy.unlink(missing_ok=True)
        if checkpoints_before is None:
            shutil.rmtree(checkpoints_dir, ignore_errors=True)
        elif checkpoints_dir.is_dir():
            for made in set(checkpoints_dir.glob("*")) - checkpoints_before:
                made.unlink()
    record = json.loads((RUN_FOLDER / "notebook_run.json").read_text())
    text = {"Command": command, "Commit": (record.get("commit") or "unknown (not a git checkout)")
            + ("+changes" if record.get("uncommitted_changes") else ""),
            "Checkpoint": run_checkpoint(since), "Notebook": f"{NOTEBOOK.relative_to(ROOT)} (size full, interactive, "
            f"Run All Cells in JupyterLab), started {record.get('started_at')}",
            "Query": query, "Browser": f"{browser}, headless, driven by Playwright",
            "Made": datetime.now().astimezone().isoformat(timespec="seconds")}
    save_png(shot, out, text, jupyter_python)
    changed = git("status", "--porcelain", "--untracked-files=no")
    if changed != tracked_before:
        print(f"warning: tracked files changed during the run:\n{changed}", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query", default="cat", help="the words typed into the caption field (default: cat)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"the PNG to write (default: {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--jupyter-python", default=sys.executable,
                        help="the Python with JupyterLab and ipywidgets that runs the server and the notebook's kernel "
                             "(default: this one)")
    parser.add_argument("--chromium", default=None,
                        help=f"the browser executable (default: the first of {', '.join(CHROMIUM_NAMES)} on PATH, "
                             "else Playwright's own)")
    parser.add_argument("--minutes", type=float, default=30.0, help="give up if the notebook runs longer (default: 30)")
    args = parser.parse_args(argv)
    if not args.query.strip():
        fail("--query: empty")
    if os.sep in args.jupyter_python:  # a path (.venv/bin/python): JupyterLab starts in notebooks/, so make it absolute
        args.jupyter_python = str(Path(args.jupyter_python).absolute())
    chromium = find_chromium(args.chromium)
    preflight(args.jupyter_python, chromium)
    command = shlex.join(["python", "tools/screenshot_query_box.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.monotonic()
    text = screenshot(args.query, args.out.resolve(), args.jupyter_python, chromium, args.minutes, command)
    print(f"{args.out}: the query box with {args.query!r}, after {time.monotonic() - started:.0f} s "
          f"(commit {text['Commit']}, {text['Checkpoint']})")


if __name__ == "__main__":
    main()
