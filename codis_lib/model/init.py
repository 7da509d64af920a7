"""Pretrained initialisation of the encoders: DeiT for the ViT, BERT for the text + fusion encoder.

As ALBEF: the ViT starts from DeiT-B/16 ImageNet weights (timm `deit_base_patch16_224`, position
embeddings resampled from 224 px to the configured size) and the BERT from `bert-base-uncased`
(the fusion layers' self-attention and feed-forward come from BERT layers 6-11; their
cross-attention starts random). The teacher then copies the student.

Sources, chosen by `config.vision.pretrained` / `config.text.pretrained`:
- None: random initialisation (the default; works offline);
- a local file (.pth/.pt/.bin/.safetensors; for BERT also a directory written by save_pretrained);
- a hub name ("deit_base_patch16_224", "bert-base-uncased"): downloaded, so online only. When the
  hub is unreachable the error says how to run offline.
Every key of the source is either loaded or listed as deliberately dropped (heads we do not use);
missing or unexpected keys are errors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from codis_lib.config import ModelConfig

__all__ = ["initialise_pretrained", "load_vit_weights", "load_bert_weights", "read_state_dict"]

_OFFLINE_HINT = (
    "To run offline, either leave model.{field}.pretrained empty (random initialisation), or on a machine with "
    "internet access save the weights once ({save}) and set model.{field}.pretrained to that local path."
)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Return the tensors stored in a .safetensors / torch file, unwrapping {'model': ...} or {'state_dict': ...}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def _hub_error(what: str, field: str, save: str, error: Exception) -> RuntimeError:
    """Return a RuntimeError explaining that the hub was asked for and could not be reached."""
    return RuntimeError(f"could not load {what} from the Hugging Face hub ({type(error).__name__}: {error}). "
                        + _OFFLINE_HINT.format(field=field, save=save))


def load_vit_weights(vit: torch.nn.Module, source: str) -> list[str]:
    """Load DeiT/timm ViT weights (hub name or local file) into `vit`; return the source keys dropped (the head)."""
    from codis_lib.model.vit import DEIT_HUB_NAME, interpolate_pos_embed  # noqa: PLC0415

    if Path(source).exists():
        state = read_state_dict(source)
    else:
        import timm  # noqa: PLC0415
        from huggingface_hub import hf_hub_download  # noqa: PLC0415

        pretrained_cfg = timm.models.get_pretrained_cfg(source)
        if pretrained_cfg is None or not pretrained_cfg.hf_hub_id:
            raise FileNotFoundError(f"vision.pretrained {source!r} is neither an existing weights file nor a timm "
                                    f"model name with hub weights (ALBEF uses {DEIT_HUB_NAME!r})")
        save = f"torch.save(timm.create_model({source!r}, pretrained=True).state_dict(), 'deit.pth')"
        try:
            # Probe the hub with a small file first, so an offline machine fails in milliseconds
            # instead of after building the full-size model.
            hf_hub_download(pretrained_cfg.hf_hub_id, "config.json")
            state = timm.create_model(source, pretrained=True, num_classes=0).state_dict()
        except Exception as error:  # noqa: BLE001 (any hub/network failure gets the same advice)
            raise _hub_error(f"ViT weights {source!r}", "vision", save, error) from error
    dropped = [k for k in state if k.startswith("head.")]  # the ImageNet classifier; ALBEF uses all tokens
    state = {k: v for k, v in state.items() if k not in dropped}
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], vit.patch_embed.num_patches)
    _load_exact(vit, state, f"ViT weights {source!r}")
    return dropped


def load_bert_weights(text_encoder: torch.nn.Module, source: str) -> list[str]:
    """Load BERT weights (hub name, save_pretrained directory or file) into our text + fusion encoder.

    Returns the source keys dropped on purpose (pooler, next-sentence head). The fusion layers'
    cross-attention is not in BERT and keeps its random initialisation, as in ALBEF.
    """
    path = Path(source)
    if path.is_file():
        state = read_state_dict(path)
    else:
        from transformers import BertForMaskedLM  # noqa: PLC0415

        try:
            state = BertForMaskedLM.from_pretrained(source, local_files_only=path.is_dir()).state_dict()
        except Exception as error:  # noqa: BLE001
            raise _hub_error(f"BERT weights {source!r}", "text",
                             f"BertForMaskedLM.from_pretrained({source!r}).save_pretrained('weights/bert')",
                             error) from error
    dropped = [k for k in state if k.startswith(("bert.pooler.", "cls.seq_relationship.")) or k.endswith("position_ids")
               or k.endswith("token_type_ids")]
    state = {k: v for k, v in state.items() if k not in dropped}
    ours = text_encoder.state_dict()
    cross = [k for k in ours if ".crossattention." in k]
    missing = [k for k in ours if k not in state and k not in cross]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        raise ValueError(f"BERT weights {source!r} do not fit the text encoder: missing {missing[:20]} "
                         f"({len(missing)} total), unexpected {unexpected[:20]} ({len(unexpected)} total); check "
                         f"text.num_layers / hidden_size / vocab_size against the checkpoint")
    _check_shapes(ours, state, f"BERT weights {source!r}")
    text_encoder.load_state_dict(state, strict=False)
    text_encoder.tie_weights()
    return dropped


def _check_shapes(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    """Raise ValueError listing every key whose shape differs."""
    bad = [f"{k}: ours {tuple(ours[k].shape)} vs {tuple(v.shape)}" for k, v in theirs.items()
           if k in ours and ours[k].shape != v.shape]
    if bad:
        raise ValueError(f"{what}: shape mismatch for {len(bad)} key(s): " + "; ".join(bad[:10]))


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` strictly, with an error that lists missing and unexpected keys and bad shapes."""
    ours = module.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:20]} ({len(missing)} total), unexpected keys "
                         f"{unexpected[:20]} ({len(unexpected)} total)")
    _check_shapes(ours, state, what)
    module.load_state_dict(state, strict=True)


def initialise_pretrained(model: torch.nn.Module, config: ModelConfig) -> None:
    """Load the pretrained encoders that `config` names into the student, then copy student -> teacher."""
    if config.vision.pretrained:
        load_vit_weights(model.visual_encoder, config.vision.pretrained)
    if config.text.pretrained:
        load_bert_weights(model.text_encoder, config.text.pretrained)
    model.copy_student_to_teacher()
