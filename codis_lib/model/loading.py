"""Every way weights enter a model: one adapter per key layout, one position-embedding resampler, one strict load.

An adapter turns a state dict of a supported layout into our key layout and says, with a reason, which
source keys it drops and which of our keys it leaves fresh (an `AdaptedState`):
- `adapt_codis`: our trainer's checkpoints ({'model': state_dict, ...}) and bare state dicts: the identity;
- `adapt_albef`: ALBEF's released checkpoints. Our parameter names were chosen to be ALBEF's, so this is
  mostly the identity too: the pretraining layout (`text_encoder.bert.*`, ALBEF_4M.pth) maps one to one;
  the retrieval layout (a BertModel as `text_encoder.*`, no MLM head, plus `idx_queue`) gets `.bert.`
  inserted. BERT's `position_ids` buffers are checked to be 0..L-1 and dropped (transformers 5 keeps them
  out of the state dict). The codebook, and the MLM head of a retrieval checkpoint, start fresh;
- `adapt_timm_vit`: DeiT/timm ViT weights for the vision encoder; the ImageNet classifier head is dropped;
- `adapt_hf_bert`: Hugging Face BERT (BertForMaskedLM) weights for the text + fusion encoder. As in ALBEF,
  BERT layers 0..n-1 give our text layers and, above them, the fusion layers' self-attention and
  feed-forward; the fusion cross-attention is not in BERT and starts fresh. Pooler, next-sentence head
  and constant buffers are dropped; old files' LayerNorm `gamma`/`beta` are read as `weight`/`bias`.

Every path ends in `load_state_strict`, which returns a `LoadReport` (keys loaded, keys deliberately left
fresh with the reason, position embeddings resampled, queues reset, source keys dropped) or raises one
`CheckpointMismatchError` listing every missing key, unexpected key and shape mismatch, loading nothing.
On the way it can resample ViT position embeddings to the model's grid (`resample_pos_embeds`, ALBEF's
256 px pretraining -> 384 px fine-tuning, DeiT's 224 px) and start the queues fresh.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from codis_lib.model.vit import interpolate_pos_embed
from codis_lib.model.weights_file import WeightsFileError, read_weights

__all__ = ["CheckpointMismatchError", "AdaptedState", "LoadReport", "QUEUE_KEYS", "read_state_dict",
           "unwrap_state_dict", "tensor_fingerprint", "adapt_codis", "adapt_albef", "adapt_timm_vit", "adapt_hf_bert",
           "resample_pos_embeds", "load_state_strict", "load_codis_weights", "load_albef_state_dict",
           "load_albef_checkpoint"]

QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
QUEUE_POLICIES = ("load", "reset", "reset_if_resized")


class CheckpointMismatchError(ValueError, RuntimeError):
    """Raised when a state dict does not fit a module; the message lists missing, unexpected and misshapen keys.

    Both a ValueError (the input is wrong) and a RuntimeError (what training checkpoints raised before), so
    callers catching either keep working.
    """


@dataclass
class AdaptedState:
    """A state dict in our key layout, with the source keys its adapter dropped and the keys of ours it leaves fresh."""

    layout: str  # "codis", "albef-pretrain", "albef-retrieval", "timm-vit", "hf-bert"
    state: dict[str, torch.Tensor]
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why it is not loaded
    fresh: dict[str, str] = field(default_factory=dict)  # key of ours -> why it keeps its initialisation


@dataclass
class LoadReport:
    """What a strict load did with every key: loaded, left fresh (and why), resampled, queues reset, dropped."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)  # keys of ours overwritten from the source, sorted
    fresh: dict[str, str] = field(default_factory=dict)  # keys of ours left as initialised -> reason, sorted
    interpolated: list[str] = field(default_factory=list)  # position embeddings resampled to the model's grid
    queues_reset: list[str] = field(default_factory=list)  # queue keys of ours started fresh
    dropped: dict[str, str] = field(default_factory=dict)  # source keys not loaded -> reason
    # loaded key -> `tensor_fingerprint` of the value that went in, so `codis_lib.model.verify.verify_load`
    # can check afterwards that the module still holds the source's tensors (no copy of them kept)
    fingerprints: dict[str, list[float]] = field(default_factory=dict, repr=False)


FINGERPRINT_SAMPLES = 8


def tensor_fingerprint(value: torch.Tensor) -> list[float]:
    """Return [float64 sum, then up to FINGERPRINT_SAMPLES elements at evenly spread positions] of a tensor.

    Equal tensors give equal samples (bit for bit) and sums equal up to the reduction order of the device;
    a tensor that was re-initialised, left random or partly overwritten differs in both, or at least the sum.
    """
    flat = value.detach().reshape(-1)
    if flat.numel() == 0:
        return [0.0]
    positions = torch.linspace(0, flat.numel() - 1, min(flat.numel(), FINGERPRINT_SAMPLES)).long().to(flat.device)
    return [float(flat.double().sum())] + [float(v) for v in flat[positions].double().cpu()]


def unwrap_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the tensors of a checkpoint: {'model': ...}, {'state_dict': ...}, {'module': ...} or a bare state dict."""
    state = checkpoint
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source} does not hold a state dict: entries {not_tensors[:10]} are not tensors (expected a "
                         f"state dict or {{'model': state_dict, ...}})")
    return dict(state)


def read_state_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Return the tensors stored in a .safetensors or torch file, unwrapped by `unwrap_state_dict`.

    The file goes through the guarded reader (`codis_lib.model.weights_file.read_weights`): its CRC-32
    digest is checked and every way it can fail is one line naming it (`what` first).
    """
    stored = read_weights(path, what)
    if not isinstance(stored, Mapping):
        raise WeightsFileError(f"{what} {path}: expected a state dict or {{'model': state_dict}}, got "
                               f"{type(stored).__name__}")
    return unwrap_state_dict(stored, f"{what} {path}")


# ------------------------------------------------------------------------------------------ adapters
def adapt_codis(checkpoint: Mapping[str, Any]) -> AdaptedState:
    """Return one of our checkpoints (the trainer's {'model': ...} file or a bare state dict) as it is."""
    return AdaptedState(layout="codis", state=unwrap_state_dict(checkpoint))


def _albef_layout(state: Mapping[str, torch.Tensor]) -> str:
    """Return "pretrain" or "retrieval" from the BERT key prefix, or raise if neither is present."""
    if any(key.startswith("text_encoder.bert.") for key in state):
        return "pretrain"
    if any(key.startswith("text_encoder.embeddings.") for key in state):
        return "retrieval"
    raise ValueError("not an ALBEF state dict: no 'text_encoder.bert.*' (pretraining) or 'text_encoder.embeddings.*' "
                     f"(retrieval) keys; first keys: {list(state)[:8]}")


def _albef_key(key: str, layout: str) -> str:
    """Return our name for an ALBEF key: retrieval checkpoints' BertModel `text_encoder(_m).*` gets `.bert.`."""
    if layout == "retrieval":
        for prefix in ("text_encoder.", "text_encoder_m."):
            if key.startswith(prefix) and not key.startswith(prefix + "cls."):
                return prefix + "bert." + key[len(prefix):]
    return key


def adapt_albef(checkpoint: Mapping[str, Any], ours: Collection[str]) -> AdaptedState:
    """Return an ALBEF pretraining or retrieval state dict (or {'model': ...}) in our layout; `ours`: our keys.

    Raises ValueError when the BERT position ids are not 0..L-1 or the keys are not ALBEF's.
    """
    state = unwrap_state_dict(checkpoint, "ALBEF checkpoint")
    layout = _albef_layout(state)
    adapted = AdaptedState(layout=f"albef-{layout}", state={})
    for key, value in state.items():
        new_key = _albef_key(key, layout)
        if new_key.endswith("embeddings.position_ids"):
            if value.reshape(-1).tolist() != list(range(value.shape[-1])):
                raise ValueError(f"{key}: expected positions 0..{value.shape[-1] - 1}, got other values")
            adapted.dropped[key] = "BERT's position ids, checked to be 0..L-1 (not state in transformers 5)"
            continue
        adapted.state[new_key] = value
    for key in ours:
        if key in adapted.state:
            continue
        if key.startswith("codebook."):
            adapted.fresh[key] = "the codebook is CODIS's own: ALBEF has none"
        elif key == "idx_queue":
            adapted.fresh[key] = "ALBEF's pretraining checkpoints have no image-id queue"
        elif layout == "retrieval" and key.startswith(("text_encoder.cls.", "text_encoder_m.cls.")):
            adapted.fresh[key] = "ALBEF's retrieval model is a BertModel without the MLM head"
    return adapted


def adapt_timm_vit(checkpoint: Mapping[str, Any]) -> AdaptedState:
    """Return DeiT/timm ViT weights (or DeiT's {'model': ...} release) in our vision encoder's layout."""
    state = unwrap_state_dict(checkpoint, "ViT weights")
    dropped = {key: "the ImageNet classifier head: ALBEF uses every token" for key in state if key.startswith("head.")}
    return AdaptedState(layout="timm-vit", state={k: v for k, v in state.items() if k not in dropped}, dropped=dropped)


def _bert_key(key: str) -> str:
    """Return the current name of a BERT key: old releases call the LayerNorm weight `gamma` and the bias `beta`."""
    if ".LayerNorm." in key:
        return key.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
    return key


def adapt_hf_bert(checkpoint: Mapping[str, Any], ours: Collection[str]) -> AdaptedState:
    """Return Hugging Face BertForMaskedLM weights in our text encoder's layout; `ours`: the text encoder's keys.

    Layer i of BERT is our layer i: text layers below, fusion layers' self-attention and feed-forward above;
    the fusion cross-attention is left fresh, as ALBEF initialises it.
    """
    state = unwrap_state_dict(checkpoint, "BERT weights")
    adapted = AdaptedState(layout="hf-bert", state={})
    for key, value in state.items():
        if key.startswith("bert.pooler."):
            adapted.dropped[key] = "BERT's pooler: the [CLS] state is used directly"
        elif key.startswith("cls.seq_relationship."):
            adapted.dropped[key] = "the next-sentence head: not a CODIS objective"
        elif key.endswith(("position_ids", "token_type_ids")):
            adapted.dropped[key] = "a constant buffer that the encoder rebuilds"
        else:
            adapted.state[_bert_key(key)] = value
    adapted.fresh = {key: "cross-attention to the image is not in BERT: random, as in ALBEF" for key in ours
                     if ".crossattention." in key and key not in adapted.state}
    return adapted


# ------------------------------------------------------------------------------------------ the load
def resample_pos_embeds(state: dict[str, torch.Tensor], ours: Mapping[str, torch.Tensor]) -> list[str]:
    """Return the ViT position-embedding keys of `state` resampled in place to the token count of `ours`.

    Every `pos_embed` / `*.pos_embed` (1, 1 + N, D) whose N differs from the model's goes through
    `interpolate_pos_embed` (bicubic, no antialiasing, CLS position kept: ALBEF's interpolate_pos_embed).
    """
    resampled = []
    for key, value in list(state.items()):
        target = ours.get(key)
        if (key != "pos_embed" and not key.endswith(".pos_embed")) or target is None:
            continue
        if value.dim() == 3 and target.dim() == 3 and value.shape[1] != target.shape[1]:
            state[key] = interpolate_pos_embed(value, target.shape[1] - 1)
            resampled.append(key)
    return resampled


def _reset_queues(tensors: dict[str, torch.Tensor], ours: Mapping[str, torch.Tensor], policy: str,
                  report: LoadReport, log: Callable[[str], None] | None) -> None:
    """Leave our queues fresh when `policy` says so: drop the source's queue tensors, record them in `report`."""
    if policy == "load":
        return
    why = "queues reset on request"
    if policy == "reset_if_resized":
        resized = [key for key in QUEUE_KEYS
                   if key in tensors and key in ours and tensors[key].shape != ours[key].shape]
        if not resized:
            return
        first = resized[0]
        if log is not None:
            log(f"{report.source}: {first} has shape {tuple(tensors[first].shape)}, the model "
                f"{tuple(ours[first].shape)}; starting with fresh queues")
        why = "the checkpoint's queues have another length: refilled within queue_size / batch steps"
    report.queues_reset = [key for key in QUEUE_KEYS if key in ours]
    for key in report.queues_reset:
        if key in tensors:
            del tensors[key]
            report.dropped[key] = why
        report.fresh[key] = why


def _mismatch_message(ours: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], fresh: Collection[str],
                      header: str, hint: str, queue_hint: str) -> str | None:
    """Return the error listing missing, unexpected and misshapen keys, or None when everything fits."""
    missing = sorted(key for key in ours if key not in tensors and key not in fresh)
    unexpected = sorted(key for key in tensors if key not in ours)
    misshapen = sorted(key for key, value in tensors.items()
                       if key in ours and tuple(value.shape) != tuple(ours[key].shape))
    if not (missing or unexpected or misshapen):
        return None
    lines = [header]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if misshapen:
        shapes = [f"{key}: checkpoint {tuple(tensors[key].shape)} vs model {tuple(ours[key].shape)}"
                  for key in misshapen]
        queues = f" (queues: {queue_hint})" if any(key in QUEUE_KEYS for key in misshapen) else ""
        lines.append(f"  shape mismatches ({len(shapes)}){queues}: {'; '.join(shapes)}")
    if hint:
        lines.append(f"  {hint}")
    return "\n".join(lines)


def load_state_strict(module: torch.nn.Module, state: AdaptedState | Mapping[str, torch.Tensor],
                      source: str = "checkpoint", *, target: str = "the model", resample: bool = False,
                      queues: str = "load", hint: str = "", queue_hint: str = "pass queues='reset' to start them fresh",
                      log: Callable[[str], None] | None = None) -> LoadReport:
    """Load `state` into `module` and return the LoadReport; raise CheckpointMismatchError if it does not fit.

    state: an adapter's AdaptedState, or a state dict already in the module's layout (layout "codis").
    resample: resample ViT position embeddings of another grid size to the module's (`resample_pos_embeds`).
    queues: "load" (strictly, like any key), "reset" (start the module's queues fresh) or "reset_if_resized"
    (fresh only when the source's queues have another length). The module must then hold every key that is
    not deliberately fresh, with the same shapes, and nothing else; otherwise the error names `source` and
    `target` and lists all problems at once (with `hint` as its last line), and nothing is loaded.
    `log` is called with one line per adaptation (resampling, queue reset).
    """
    if queues not in QUEUE_POLICIES:
        raise ValueError(f"queues must be one of {QUEUE_POLICIES}, got {queues!r}")
    adapted = state if isinstance(state, AdaptedState) else AdaptedState(layout="codis", state=dict(state))
    ours = module.state_dict()
    tensors = dict(adapted.state)
    report = LoadReport(source=source, layout=adapted.layout, dropped=dict(adapted.dropped),
                        fresh={key: why for key, why in adapted.fresh.items() if key in ours and key not in tensors})
    if resample:
        shapes = {key: tuple(value.shape) for key, value in tensors.items()}
        report.interpolated = resample_pos_embeds(tensors, ours)
        for key in report.interpolated:
            if log is not None:
                log(f"{source}: resampling {key} {shapes[key]} -> {tuple(ours[key].shape)}")
    _reset_queues(tensors, ours, queues, report, log)
    problems = _mismatch_message(ours, tensors, report.fresh, f"{source} does not fit {target}:", hint, queue_hint)
    if problems is not None:
        raise CheckpointMismatchError(problems)
    # In-place copies (fresh keys copy onto themselves), so tied weights such as the MLM decoder stay tied.
    module.load_state_dict({**tensors, **{key: ours[key] for key in report.fresh}}, strict=True)
    report.loaded = sorted(tensors)
    # As stored in the module: in its dtype (a half-precision file loads into float32 parameters).
    report.fingerprints = {key: tensor_fingerprint(tensors[key].to(ours[key].dtype)) for key in report.loaded}
    report.fresh = dict(sorted(report.fresh.items()))
    return report


# ------------------------------------------------------------------------------------------ whole files
def load_codis_weights(model: torch.nn.Module, path: str | os.PathLike, *, what: str = "checkpoint file",
                       log: Callable[[str], None] | None = None) -> LoadReport:
    """Return the report of initialising `model` from one of our checkpoint files (fine-tuning), strictly.

    What fine-tuning expects is adapted and reported: ViT position embeddings are resampled when the image
    size changed (ALBEF: 256 -> 384 px), and queues of another length start fresh. Anything else that does
    not fit raises CheckpointMismatchError listing the keys. `what` names the file in a FileNotFoundError.
    """
    state = read_state_dict(path, what)
    return load_state_strict(model, adapt_codis(state), str(path), resample=True, queues="reset_if_resized", log=log)


def load_albef_state_dict(model: torch.nn.Module, checkpoint: Mapping[str, Any], *, load_queues: bool = True,
                          source: str = "ALBEF checkpoint") -> LoadReport:
    """Return the report of loading an ALBEF state dict (or {'model': state_dict}) into a CODIS model, strictly.

    Position embeddings are resampled when the image size differs; load_queues=False starts our queues
    fresh (e.g. when the queue size differs). Raises CheckpointMismatchError listing missing keys,
    unexpected keys and shape mismatches; nothing is loaded then.
    """
    adapted = adapt_albef(checkpoint, model.state_dict())
    return load_state_strict(model, adapted, f"{source} ({adapted.layout} layout)", resample=True,
                             queues="load" if load_queues else "reset",
                             queue_hint="pass load_queues=False to start them fresh")


def load_albef_checkpoint(model: torch.nn.Module, path: str | os.PathLike, **kwargs: Any) -> LoadReport:
    """Return the report of loading an ALBEF checkpoint file (e.g. ALBEF_4M.pth); see load_albef_state_dict."""
    state = read_state_dict(path, "ALBEF checkpoint")
    return load_albef_state_dict(model, state, source=f"ALBEF checkpoint {path}", **kwargs)
