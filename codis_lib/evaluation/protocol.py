"""What each number of the poster was measured with, and a check of an evaluation against it.

Zero-shot numbers below the paper's are the most common complaint about ALBEF-style models, and most of
the time the protocol differs, not the model. Two things are easy to miss (the CODIS paper follows
ALBEF's protocol and compares against ALBEF's numbers):

- the Flickr30K *zero-shot* column is evaluated with the model FINE-TUNED ON COCO, not the pretrained one
  (ALBEF's paper, and `codis_lib.evaluation.paper`);
- the pretrained checkpoint is evaluated at its pretraining resolution, 256 px (ALBEF's Pretrain config,
  our pretrain_4m.yaml), while the retrieval fine-tuned checkpoints are at 384 px (ALBEF's
  Retrieval_coco / Retrieval_flickr configs, our finetune_coco.yaml / finetune_flickr.yaml).

`PROTOCOL` holds one `ProtocolRow` per row of the poster's two tables (setting x dataset x method): the
checkpoint it needs, the image size, ALBEF's test file, k_test (ITM re-ranking depth: 256 on COCO, 128 on
Flickr30K) and the expected recall (from `paper.PAPER_RESULTS`). `protocol_markdown()` renders it; the
table of docs/evaluation.md is that rendering (a test keeps them equal). `protocol_issues(...)` compares one
evaluation's checkpoint kind, image size, k and test file with a row and returns the differences as
lines, without evaluating anything; `codis-eval --paper ... --setting ...` prints them (and with
`--strict` refuses to run). `checkpoint_kind_of_ours` / `checkpoint_kind_of_albef` tell what a
checkpoint is: from our run's config (train.task and the fine-tuning files), or from an ALBEF
checkpoint's key layout (pretraining: `text_encoder.bert.*` with the MLM head; retrieval fine-tuned: a
BertModel as `text_encoder.*`, no MLM head, plus `idx_queue`; `codis_lib.model.loading` tells them apart
the same way). What cannot be told is said in a line of its own, never passed silently.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from codis_lib.evaluation.paper import DATASET_NAMES, METRIC_ORDER, PAPER_RESULTS

__all__ = ["ProtocolRow", "CheckpointKind", "ProtocolIssue", "PROTOCOL", "CHECKPOINT_NAMES", "protocol_row",
           "protocol_markdown", "checkpoint_kind", "checkpoint_kind_of_ours", "checkpoint_kind_of_albef",
           "read_run_config", "protocol_issues",
           "TABLE_BEGIN", "TABLE_END"]

Checkpoint = Literal["pretrained", "coco-fine-tuned", "flickr-fine-tuned"]
# in words, as the table and the warnings say it
CHECKPOINT_NAMES: dict[str, str] = {"pretrained": "pretrained", "coco-fine-tuned": "fine-tuned on COCO",
                                    "flickr-fine-tuned": "fine-tuned on Flickr30K"}
SPLIT_FILES = {"coco": "coco_test.json", "flickr": "flickr30k_test.json"}  # ALBEF's retrieval test files
K_TEST = {"coco": 256, "flickr": 128}  # ALBEF's Retrieval_coco.yaml / Retrieval_flickr.yaml k_test
PRETRAIN_SIZE, FINETUNE_SIZE = 256, 384  # pretrain_4m.yaml (base preset) / finetune_*.yaml vision.image_size
TABLE_BEGIN = "<!-- protocol table: rendered by codis_lib.evaluation.protocol.protocol_markdown() -->"
TABLE_END = "<!-- end of protocol table -->"


@dataclass(frozen=True)
class ProtocolRow:
    """One row of the poster: what was evaluated, how, and what it scored."""

    setting: str  # "zero-shot" | "fine-tuned"
    dataset: str  # "coco" | "flickr"
    method: str  # "ALBEF 4M" | "CODIS"
    checkpoint: Checkpoint  # the checkpoint the row is measured on
    image_size: int  # evaluation resolution (px)
    split_file: str  # ALBEF's retrieval test file
    k_test: int  # candidates re-ranked by ITM per query
    expected: Mapping[str, float]  # the poster's recall (METRIC_ORDER keys and the means)

    @property
    def title(self) -> str:
        """Return the row's name in warnings: "Flickr30K zero-shot"."""
        return f"{DATASET_NAMES[self.dataset].split(' ')[0]} {self.setting}"


def _checkpoint_for(setting: str, dataset: str) -> Checkpoint:
    """Return the checkpoint a (setting, dataset) cell is measured on: ALBEF's protocol, which CODIS follows."""
    if setting == "fine-tuned":
        return "coco-fine-tuned" if dataset == "coco" else "flickr-fine-tuned"
    # zero-shot: COCO with the pretrained model; Flickr30K with the model fine-tuned on COCO (ALBEF's paper)
    return "pretrained" if dataset == "coco" else "coco-fine-tuned"


PROTOCOL: tuple[ProtocolRow, ...] = tuple(
    ProtocolRow(setting=setting, dataset=dataset, method=method, checkpoint=_checkpoint_for(setting, dataset),
                image_size=PRETRAIN_SIZE if _checkpoint_for(setting, dataset) == "pretrained" else FINETUNE_SIZE,
                split_file=SPLIT_FILES[dataset], k_test=K_TEST[dataset], expected=dict(row))
    for setting, datasets in PAPER_RESULTS.items()
    for dataset, methods in datasets.items()
    for method, row in methods.items())


def protocol_row(setting: str, dataset: str) -> ProtocolRow:
    """Return the protocol of a (setting, dataset) cell (the same for both methods); ValueError names a bad one."""
    for row in PROTOCOL:
        if row.setting == setting and row.dataset == dataset:
            return row
    raise ValueError(f"no poster row for --setting {setting!r} --paper {dataset!r}: settings "
                     f"{tuple(PAPER_RESULTS)}, datasets {tuple(SPLIT_FILES)}")


def protocol_markdown() -> str:
    """Return `PROTOCOL` as a markdown table (the copy in docs/evaluation.md must equal it)."""
    lines = ["| Table | Dataset | Method | Checkpoint | Image size | Test file | k_test | TR R@1 / 5 / 10 "
             "| IR R@1 / 5 / 10 | mean |",
             "|---|---|---|---|---:|---|---:|---|---|---:|"]
    for row in PROTOCOL:
        text = " / ".join(f"{row.expected[key]:.1f}" for key in METRIC_ORDER[:3])
        image = " / ".join(f"{row.expected[key]:.1f}" for key in METRIC_ORDER[3:])
        lines.append(f"| {row.setting} | {DATASET_NAMES[row.dataset]} | {row.method} | "
                     f"{CHECKPOINT_NAMES[row.checkpoint]} | {row.image_size} px | `{row.split_file}` | "
                     f"{row.k_test} | {text} | {image} | {row.expected['r_mean']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ checkpoint kinds
@dataclass(frozen=True)
class CheckpointKind:
    """What a checkpoint is, as far as can be told, and how that was told.

    stage: "pretrained", "fine-tuned", or None (cannot be told); dataset: for a fine-tuned one "coco",
    "flickr", "other" (e.g. the emoji corpus) or None (cannot be told); evidence: in words, for the lines.
    """

    stage: str | None
    dataset: str | None
    evidence: str

    @property
    def name(self) -> str:
        """Return the kind in words: "pretrained", "fine-tuned on COCO", "fine-tuned (on what: unknown)"..."""
        if self.stage is None:
            return "of unknown kind"
        if self.stage == "pretrained":
            return "pretrained"
        return {"coco": "fine-tuned on COCO", "flickr": "fine-tuned on Flickr30K", "other": "fine-tuned on other data",
                None: "fine-tuned (on what: unknown)"}[self.dataset]


def _dataset_of_files(files) -> str | None:
    """Return "coco" / "flickr" when every named file says one of them (ALBEF's coco_* / flickr30k_* names), else None."""
    found = set()
    for file in files:
        name = Path(str(file)).name.lower()
        found |= {dataset for dataset in ("coco", "flickr") if dataset in name}
    return found.pop() if len(found) == 1 else None


def checkpoint_kind_of_ours(run_config) -> CheckpointKind:
    """Return the kind of one of our checkpoints from its run config (config.yaml or the checkpoint's own copy).

    train.task "pretrain" is the pretrained model; "finetune" is fine-tuned on the run's data: the emoji
    corpus ("other"), or ALBEF JSON files whose names say COCO or Flickr30K (data.train_files).
    """
    task, data = run_config.train.task, run_config.data
    if task == "pretrain":
        return CheckpointKind("pretrained", None, "train.task: pretrain")
    if data.dataset == "emoji":
        return CheckpointKind("fine-tuned", "other", "train.task: finetune on the emoji corpus")
    dataset = _dataset_of_files(data.train_files)
    files = ", ".join(Path(str(f)).name for f in data.train_files)
    return CheckpointKind("fine-tuned", dataset, f"train.task: finetune, data.train_files: {files}")


def read_run_config(checkpoint: Path):
    """Return the run config of one of our checkpoints: config.yaml beside it (cheap), else the checkpoint's copy."""
    from codis_lib.run_config import run_config_from_dict, without_retired_keys

    beside = checkpoint.parent / "config.yaml"
    if beside.is_file():
        import yaml

        stored = yaml.safe_load(beside.read_text())
        return run_config_from_dict(without_retired_keys(stored), source=str(beside))
    from codis_lib.evaluation.models import _read_checkpoint

    stored = _read_checkpoint(checkpoint)
    return run_config_from_dict(without_retired_keys(stored["config"]), source=str(checkpoint))


def _load_mapping(path: Path) -> Mapping[str, Any]:
    """Return the torch-saved dict at `path`, memory-mapped when the format allows (only the keys are read)."""
    from codis_lib.model.weights_file import read_weights

    # the keys only: the digest is checked by the load that evaluates (every failure is one line naming the file)
    stored = read_weights(path, "ALBEF checkpoint", verify=False, mmap=True, log=None)
    if not isinstance(stored, Mapping):
        raise ValueError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(stored).__name__}")
    return stored


def checkpoint_kind_of_albef(checkpoint: str | os.PathLike | Mapping[str, Any]) -> CheckpointKind:
    """Return the kind of an ALBEF checkpoint (a file, or the dict torch.load returns) from its key layout.

    Pretraining layout (`text_encoder.bert.*`, the MLM head `text_encoder.cls.*`, no `idx_queue`):
    pretrained (ALBEF_4M.pth). Retrieval layout (a BertModel as `text_encoder.*`, no MLM head, with
    `idx_queue`): fine-tuned, on COCO or Flickr30K as the file says, if it does: the training config
    ALBEF's scripts save beside the weights ('config' -> 'train_file'), else the file name (coco /
    flickr in it); otherwise unknown. An ALBEF-layout export of ours (`export_albef_checkpoint`, a
    `<stem>.config.json` beside it) always has the pretraining layout, so the layout says nothing there.
    """
    from codis_lib.model.loading import _albef_layout, unwrap_state_dict

    path = None if isinstance(checkpoint, Mapping) else Path(checkpoint)
    if path is not None and path.with_name(path.stem + ".config.json").is_file():
        return CheckpointKind(None, None, f"{path.name} is an ALBEF-layout export of ours ({path.stem}.config.json "
                                          "beside it), whose keys do not say whether it was fine-tuned")
    stored = checkpoint if path is None else _load_mapping(path)
    layout = _albef_layout(unwrap_state_dict(stored, str(path or "ALBEF checkpoint")))
    if layout == "pretrain":
        return CheckpointKind("pretrained", None, "ALBEF's pretraining key layout (text_encoder.bert.*, MLM head)")
    evidence = "ALBEF's retrieval key layout (no MLM head, idx_queue)"
    config = stored.get("config")
    if isinstance(config, Mapping) and config.get("train_file"):
        files = config["train_file"] if isinstance(config["train_file"], (list, tuple)) else [config["train_file"]]
        dataset = _dataset_of_files(files)
        if dataset is not None:
            return CheckpointKind("fine-tuned", dataset, f"{evidence}, its config's train_file: "
                                                         f"{', '.join(Path(str(f)).name for f in files)}")
    dataset = _dataset_of_files([path.name]) if path is not None else None
    if dataset is not None:
        return CheckpointKind("fine-tuned", dataset, f"{evidence}, the file name {path.name}")
    return CheckpointKind("fine-tuned", None, f"{evidence}; neither its config nor its file name says COCO or "
                                              "Flickr30K")


def checkpoint_kind(checkpoint: str | os.PathLike | None = None, *, albef_checkpoint=None) -> CheckpointKind:
    """Return the kind of one of our checkpoints (its run config) or of an ALBEF checkpoint (its keys)."""
    if albef_checkpoint is not None:
        return checkpoint_kind_of_albef(albef_checkpoint)
    return checkpoint_kind_of_ours(read_run_config(Path(checkpoint)))


# ------------------------------------------------------------------------------------------ the check
@dataclass(frozen=True)
class ProtocolIssue:
    """One difference from a poster row: "mismatch" (it differs) or "unknown" (it cannot be told)."""

    severity: Literal["mismatch", "unknown"]
    message: str


def _kind_issue(kind: CheckpointKind, row: ProtocolRow) -> ProtocolIssue | None:
    """Return how `kind` differs from the checkpoint `row` needs, None when it is the one."""
    needed = f"the paper uses the model {CHECKPOINT_NAMES[row.checkpoint]}"
    if row.checkpoint == "pretrained":
        needed = "the paper uses the pretrained model"
    if kind.stage is None:
        return ProtocolIssue("unknown", f"cannot tell whether the checkpoint is pretrained or fine-tuned "
                                        f"({kind.evidence}); in the {row.title} row {needed}")
    wanted_stage = "pretrained" if row.checkpoint == "pretrained" else "fine-tuned"
    if kind.stage != wanted_stage:
        return ProtocolIssue("mismatch", f"a {kind.name} checkpoint in the {row.title} row: {needed} "
                                         f"(told from {kind.evidence})")
    if wanted_stage == "pretrained":
        return None
    wanted_dataset = row.checkpoint.split("-")[0]
    if kind.dataset is None:
        return ProtocolIssue("unknown", f"cannot tell what the fine-tuned checkpoint was fine-tuned on "
                                        f"({kind.evidence}); in the {row.title} row {needed}")
    if kind.dataset != wanted_dataset:
        return ProtocolIssue("mismatch", f"a checkpoint {kind.name} in the {row.title} row: {needed} "
                                         f"(told from {kind.evidence})")
    return None


def protocol_issues(setting: str, dataset: str, *, kind: CheckpointKind, image_size: int | None,
                    k: int | None, split_file: str | os.PathLike | None) -> list[ProtocolIssue]:
    """Return how an evaluation differs from the poster's (setting, dataset) row; empty when it follows it.

    kind: the checkpoint's (`checkpoint_kind`); image_size: the resolution it is evaluated at; k: the
    ITM re-ranking depth; split_file: the test file (its name is compared with ALBEF's). None for any of
    the last three says it cannot be told (an "unknown" issue). Nothing is evaluated or loaded.
    """
    row = protocol_row(setting, dataset)
    issues = [issue for issue in (_kind_issue(kind, row),) if issue is not None]
    if image_size is None:
        issues.append(ProtocolIssue("unknown", f"the image size is not known: the paper evaluates the {row.title} row "
                                               f"at {row.image_size} px"))
    elif image_size != row.image_size:
        on = f"a {kind.name} checkpoint" if kind.stage is not None else "this checkpoint"
        issues.append(ProtocolIssue("mismatch", f"{image_size} px on {on}: the paper evaluates it at "
                                                f"{row.image_size} in the {row.title} row"))
    if k is not None and k != row.k_test:
        issues.append(ProtocolIssue("mismatch", f"--k {k}: the paper re-ranks the top {row.k_test} per query in the "
                                                f"{row.title} row (ALBEF's k_test)"))
    if split_file is None:
        issues.append(ProtocolIssue("unknown", f"the test file is not known: the {row.title} row uses ALBEF's "
                                               f"{row.split_file}"))
    elif Path(str(split_file)).name != row.split_file:
        issues.append(ProtocolIssue("mismatch", f"test file {Path(str(split_file)).name}: the {row.title} row uses "
                                                f"ALBEF's {row.split_file}"))
    return issues


if __name__ == "__main__":  # print the table, e.g. to paste into docs/evaluation.md
    print(protocol_markdown())
