"""Regenerate the figures the README and docs show (docs/figures/) from reading-size runs of the notebooks.

Running a notebook never changes a tracked file: it writes its figures under its output folder
(`notebooks/outputs/NN/figures`, ignored by git). This command is the only writer of docs/figures/:

    python tools/regenerate_figures.py                       # run notebooks 01-06 at size "full", copy their figures
    python tools/regenerate_figures.py --notebooks 05 06     # only these notebooks
    python tools/regenerate_figures.py --from-runs           # run nothing: copy from the runs already made

Each notebook runs with papermill in notebooks/ with its own defaults (size "full", output folder
`outputs/NN`); its executed copy stays in that folder. A run is taken only when its
`notebook_run.json` (written by `codis_lib.start_notebook`) says size "full", and only the figures it
wrote (not older files left in the folder). Notebooks 05 and 06 must have scored README command 1's
checkpoint (runs/pretrain_emoji/checkpoint_final.pt, docs/figures.md says why) unless --any-checkpoint.

Every PNG is copied pixel for pixel with Pillow and gains PNG text chunks: `Command` (this command
line), `Commit` (the git commit the notebook ran at, "+changes" when tracked files differed from it),
`Notebook`, `Run` (the output folder and its start time), `Checkpoint` where the run scored one.
Read them back with `PIL.Image.open(path).text`.
"""
from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
FIGURE_DIR = ROOT / "docs" / "figures"  # the tracked figures; only this command writes here
RUN_RECORD = "notebook_run.json"  # codis_lib.course.RUN_RECORD (read here without importing torch)
WITH_FIGURES = ("01", "02", "03", "04", "05", "06")  # 07 draws only its run's loss curves, which no page shows
MAIN_CHECKPOINT = "runs/pretrain_emoji/checkpoint_final.pt"  # README command 1
SCORE_MAIN_CHECKPOINT = ("05", "06")  # the notebooks that score it (04 records the checkpoint it trains)


def notebook_file(number: str) -> Path:
    """Return notebooks/<number>_*.ipynb, the one numbered notebook of that number."""
    found = sorted(NOTEBOOK_DIR.glob(f"{number}_*.ipynb"))
    if len(found) != 1:
        raise SystemExit(f"--notebooks {number}: expected one notebooks/{number}_*.ipynb, found {len(found)}")
    return found[0]


def parameter_defaults(notebook: Path) -> dict:
    """Return the literal values assigned in a notebook's `parameters` cell."""
    cells = json.loads(notebook.read_text())["cells"]
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise SystemExit(f"{notebook}: no cell tagged 'parameters'")
    values = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # not a literal: not a folder this command needs
    return values


def run_folder(notebook: Path) -> Path:
    """Return the notebook's default output folder (its `output_dir`, relative to notebooks/)."""
    output_dir = parameter_defaults(notebook).get("output_dir")
    if not isinstance(output_dir, str):
        raise SystemExit(f"{notebook}: its parameters cell sets no output_dir string")
    return (NOTEBOOK_DIR / output_dir).resolve()


def run_notebook(notebook: Path) -> None:
    """Execute the notebook at size "full" in notebooks/, its executed copy in its output folder."""
    import papermill as pm

    folder = run_folder(notebook)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"running {notebook.relative_to(ROOT)} at size 'full' (executed copy in {folder.relative_to(ROOT)})")
    pm.execute_notebook(str(notebook), str(folder / notebook.name), parameters={"size": "full"},
                        cwd=str(NOTEBOOK_DIR), kernel_name="python3", progress_bar=False)


def read_run(notebook: Path, *, any_checkpoint: bool) -> tuple[dict, dict]:
    """Return the run record and metrics of the notebook's reading-size run; exit naming what is wrong."""
    folder = run_folder(notebook)
    record_file, metrics_file = folder / RUN_RECORD, folder / "metrics.json"
    if not record_file.is_file():
        raise SystemExit(f"{record_file}: missing; run the notebook first (this command without --from-runs)")
    record = json.loads(record_file.read_text())
    if record.get("size") != "full":
        raise SystemExit(f"{record_file}: a size={record.get('size')!r} run; the docs show reading-size runs "
                         f"(size 'full'): rerun without --from-runs")
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    checkpoint = metrics.get("checkpoint")
    if (checkpoint and notebook.name[:2] in SCORE_MAIN_CHECKPOINT and not any_checkpoint
            and not str(checkpoint).endswith(MAIN_CHECKPOINT)):
        raise SystemExit(f"{metrics_file}: scored {checkpoint}, not README command 1's {MAIN_CHECKPOINT} "
                         f"(run `codis-pretrain` first, or pass --any-checkpoint)")
    return record, metrics


def new_figures(number: str, record: dict) -> tuple[list[Path], list[Path]]:
    """Return (figures the run wrote, older ones left in its figure folder), NN_*.png by name."""
    started = datetime.fromisoformat(record["started_at"]).timestamp()
    pngs = sorted(Path(record["figure_dir"]).glob(f"{number}_*.png"))
    made = [p for p in pngs if p.stat().st_mtime >= started - 1]  # file times round to the second
    return made, [p for p in pngs if p not in made]


def figure_text(notebook: Path, record: dict, metrics: dict, command: str) -> dict[str, str]:
    """Return the PNG text chunks that say which command, commit, notebook and run made a figure."""
    commit = record.get("commit") or "unknown (not a git checkout)"
    text = {"Command": command, "Commit": commit + ("+changes" if record.get("uncommitted_changes") else ""),
            "Notebook": f"{notebook.relative_to(ROOT)} (size full)",
            "Run": f"{run_folder(notebook).relative_to(ROOT)}, started {record['started_at']}"}
    if metrics.get("checkpoint"):
        text["Checkpoint"] = f"{metrics['checkpoint']} ({metrics.get('checkpoint_step', '?')} steps)"
    return text


def copy_with_text(source: Path, target: Path, text: dict[str, str]) -> None:
    """Write `source`'s pixels to `target` as PNG, keeping its text chunks and adding `text`."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    with Image.open(source) as image:
        image.load()
        info = PngInfo()
        for key, value in {**image.text, **text}.items():
            info.add_text(key, str(value))
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, pnginfo=info)


def regenerate(numbers: list[str], *, from_runs: bool, any_checkpoint: bool, command: str,
               figure_dir: Path = FIGURE_DIR) -> list[Path]:
    """Run (unless from_runs) and copy each notebook's figures into figure_dir; return the files written."""
    notebooks = [notebook_file(number) for number in numbers]
    written = []
    for number, notebook in zip(numbers, notebooks):
        if not from_runs:
            run_notebook(notebook)
        record, metrics = read_run(notebook, any_checkpoint=any_checkpoint)
        made, older = new_figures(number, record)
        if not made:
            raise SystemExit(f"{record['figure_dir']}: the run of {notebook.name} wrote no {number}_*.png")
        text = figure_text(notebook, record, metrics, command)
        for png in made:
            copy_with_text(png, figure_dir / png.name, text)
            written.append(figure_dir / png.name)
        print(f"{notebook.name}: {len(made)} figures -> {figure_dir} (commit {text['Commit']})"
              + (f"; left out, older than the run: {', '.join(p.name for p in older)}" if older else ""))
        stale = sorted({p.name for p in figure_dir.glob(f"{number}_*.png")} - {p.name for p in made})
        if stale:
            print(f"  {figure_dir.name}/ also holds {', '.join(stale)}, which this run did not make "
                  f"(git rm them if no page shows them)")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", nargs="+", default=list(WITH_FIGURES), metavar="NN",
                        help=f"notebook numbers (default: {' '.join(WITH_FIGURES)})")
    parser.add_argument("--from-runs", action="store_true",
                        help="run nothing: copy the figures of the reading-size runs in notebooks/outputs/NN")
    parser.add_argument("--any-checkpoint", action="store_true",
                        help=f"accept runs of 05/06 that scored another checkpoint than {MAIN_CHECKPOINT}")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "tools/regenerate_figures.py", *(sys.argv[1:] if argv is None else argv)])
    regenerate(args.notebooks, from_runs=args.from_runs, any_checkpoint=args.any_checkpoint, command=command)


if __name__ == "__main__":
    main()
