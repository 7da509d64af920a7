"""Models to evaluate: our training checkpoints, ALBEF's released checkpoints, and ALBEF-format exports of ours.

ALBEF's checkpoints (ALBEF_4M.pth, the COCO / Flickr30K fine-tuned ones) are read with the model
helper's checked loader (`codis_lib.model.albef_checkpoint`); the architecture comes from ALBEF's own
config files (the YAML of a task, e.g. configs/Retrieval_flickr.yaml, and configs/config_bert.json),
or from ALBEF's published values below when they are not given. `export_albef_checkpoint` writes one
of our models in ALBEF's key layout (no codebook, ALBEF's `position_ids` buffers), so that the ALBEF
path can be exercised end to end without ALBEF's 4M-image weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

# ALBEF's configs/config_bert.json (bert-base-uncased split at layer 6) and the retrieval YAMLs' values.
ALBEF_BERT_CONFIG: dict[str, Any] = {
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30522, "fusion_layer": 6,
    "encoder_width": 768,
}
ALBEF_RETRIEVAL_CONFIG: dict[str, Any] = {
    "image_res": 384, "embed_dim": 256, "queue_size": 65536, "temp": 0.07, "momentum": 0.995, "alpha": 0.4,
    "vision_width": 768, "k_test": 128,
}
# keys of ours that ALBEF's pretraining checkpoints do not have
_NOT_IN_ALBEF = ("codebook.", "idx_queue")


@dataclass
class LoadedModel:
    """A model ready for evaluation, the tokenizer that feeds it, and where it came from."""

    model: Any  # codis_lib.model.CODIS in eval mode
    tokenizer: Any
    description: str
    run_config: Any = None  # our RunConfig when loaded from a training checkpoint


def _read_mapping(path: str | os.PathLike, what: str) -> dict:
    """Return the dict in a YAML or JSON file, with errors naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{what} {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a mapping, found {type(data).__name__}")
    return data


def albef_config(task_config: str | os.PathLike | Mapping | None = None,
                 bert_config: str | os.PathLike | Mapping | None = None,
                 image_res: int | None = None) -> dict[str, Any]:
    """Return an ALBEF config dict ({top-level keys..., 'bert': {...}}) from ALBEF's files or its published values."""
    config = dict(ALBEF_RETRIEVAL_CONFIG)
    if task_config is not None:
        config.update(task_config if isinstance(task_config, Mapping) else _read_mapping(task_config, "ALBEF config"))
    from codis_lib.model.albef_checkpoint import check_albef_bert_config

    bert = config.get("bert") if isinstance(config.get("bert"), Mapping) else None
    if bert is not None and task_config is not None and not isinstance(task_config, Mapping):
        check_albef_bert_config(bert, f"ALBEF config {task_config}: bert")
    if bert_config is not None:
        bert = bert_config if isinstance(bert_config, Mapping) else _read_mapping(bert_config, "ALBEF BERT config")
        if not isinstance(bert_config, Mapping):
            check_albef_bert_config(bert, f"ALBEF BERT config {bert_config}")
    config["bert"] = dict(bert if bert is not None else ALBEF_BERT_CONFIG)
    if image_res is not None:
        config["image_res"] = int(image_res)
    return config


def load_albef_model(checkpoint: str | os.PathLike, *, task_config=None, bert_config=None,
                     tokenizer: str | os.PathLike = "bert-base-uncased", image_res: int | None = None,
                     device: str | torch.device = "cpu", allow_download: bool = False) -> LoadedModel:
    """Return an ALBEF checkpoint loaded (checked key by key) into our model in "albef" mode, with its tokenizer.

    The queues are not loaded (evaluation does not use them, and their length need not match).
    """
    from codis_lib.data.tokenizer import load_tokenizer
    from codis_lib.model import build_model
    from codis_lib.model.albef_checkpoint import model_config_from_albef
    from codis_lib.model.loading import load_albef_checkpoint

    model_config = model_config_from_albef(albef_config(task_config, bert_config, image_res), mode="albef")
    text_tokenizer = load_tokenizer(tokenizer, allow_download=allow_download)
    if len(text_tokenizer) > model_config.text.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {len(text_tokenizer)} tokens but the ALBEF BERT config has "
                         f"vocab_size {model_config.text.vocab_size}: they do not belong together")
    # the special ids come from the tokenizer; the vocabulary size stays the checkpoint's
    model_config = model_config.with_overrides({f"text.{name}_token_id": getattr(text_tokenizer, f"{name}_token_id")
                                                for name in ("pad", "unk", "cls", "sep", "mask")})
    model = build_model(model_config)
    report = load_albef_checkpoint(model, checkpoint, load_queues=False)
    model.to(device).eval()
    described = (f"ALBEF checkpoint {checkpoint} ({report.layout} layout, {len(report.loaded)} tensors loaded, "
                 f"fresh: {', '.join(sorted({k.split('.')[0] for k in report.fresh})) or 'none'}"
                 + (f", resampled: {', '.join(report.interpolated)}" if report.interpolated else "") + ")")
    return LoadedModel(model=model, tokenizer=text_tokenizer, description=described)


def load_our_model(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu",
                   tokenizer: str | os.PathLike | None = None, weights: str = "student") -> LoadedModel:
    """Return a model saved by our trainer (codis-pretrain / codis-finetune / notebook 04), with its tokenizer.

    ``tokenizer``: None uses the run folder's copy; a folder or name is used instead of it (and named in
    the description). Either way it is checked against the checkpoint (`check_tokenizer_matches`).
    ``weights``: "student" (what training optimised) or "teacher" (its EMA copy, see `load_trained_model`).
    """
    from codis_lib.evaluation.models import load_trained_model

    trained = load_trained_model(checkpoint, device=device, tokenizer=tokenizer, weights=weights)
    given = f", tokenizer {trained.tokenizer_source}" if tokenizer is not None else ""
    teacher = ", EMA teacher weights" if weights == "teacher" else ""
    return LoadedModel(model=trained.model, tokenizer=trained.tokenizer, run_config=trained.run_config,
                       description=f"checkpoint {checkpoint} ({trained.model_config.mode}, step {trained.step}"
                                   f"{given}{teacher})")


def albef_state_dict(model) -> dict[str, torch.Tensor]:
    """Return `model`'s weights under ALBEF's pretraining key set: no codebook or idx_queue, with ALBEF's position_ids."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()
             if not key.startswith(_NOT_IN_ALBEF)}
    positions = torch.arange(model.config.text.max_position_embeddings)[None, :]  # (1, L) as BERT registers it
    for encoder in ("text_encoder", "text_encoder_m"):
        state[f"{encoder}.bert.embeddings.position_ids"] = positions.clone()
    return state


def albef_config_of(model_config) -> dict[str, Any]:
    """Return the ALBEF config dict (top-level keys + 'bert' + 'vit') describing one of our ModelConfigs."""
    text, vision = model_config.text, model_config.vision
    bert = dict(ALBEF_BERT_CONFIG)
    bert.update(hidden_size=text.hidden_size, num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
                intermediate_size=text.intermediate_size, max_position_embeddings=text.max_position_embeddings,
                type_vocab_size=text.type_vocab_size, vocab_size=text.vocab_size, layer_norm_eps=text.layer_norm_eps,
                fusion_layer=text.num_layers - text.fusion_layers, encoder_width=vision.width,
                pad_token_id=text.pad_token_id, hidden_dropout_prob=text.hidden_dropout,
                attention_probs_dropout_prob=text.attention_dropout)
    vit = {"img_size": vision.image_size, "patch_size": vision.patch_size, "embed_dim": vision.width,
           "depth": vision.depth, "num_heads": vision.num_heads, "mlp_ratio": vision.mlp_ratio,
           "qkv_bias": vision.qkv_bias, "norm_eps": vision.norm_eps, "drop_path_rate": vision.drop_path_rate}
    return {"image_res": vision.image_size, "embed_dim": model_config.embed_dim, "queue_size": model_config.queue_size,
            "temp": model_config.temp, "momentum": model_config.momentum, "alpha": model_config.alpha,
            "mlm_probability": model_config.mlm_probability, "vision_width": vision.width,
            "pad_token_id": text.pad_token_id, "cls_token_id": text.cls_token_id,
            "mask_token_id": text.mask_token_id, "bert": bert, "vit": vit}


def export_albef_checkpoint(model, path: str | os.PathLike) -> tuple[Path, Path]:
    """Return (checkpoint path, config path) after writing `model` as an ALBEF checkpoint {'model': state_dict}.

    The config (ALBEF's keys + 'bert' + 'vit') goes beside it as `<stem>.config.json`. ALBEF's format holds a
    ViT image encoder: a model with another tower (model.vision.backbone) is refused in one line.
    """
    if model.config.vision.backbone != "vit":
        raise ValueError(f"ALBEF's checkpoint format holds a ViT image encoder; this model's is "
                         f"{model.config.vision.backbone} (model.vision.backbone)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": albef_state_dict(model)}, temporary)
    os.replace(temporary, path)
    config_path = path.with_name(path.stem + ".config.json")
    config_path.write_text(json.dumps(albef_config_of(model.config), indent=2))
    return path, config_path
