"""Load checkpoints in ALBEF's layout (ALBEF_4M.pth, the retrieval fine-tuned ones) into CODIS.

Our parameter names were chosen to be ALBEF's, so the mapping is mostly the identity; what this
module adds is the checking. Every key of the checkpoint is accounted for:
- loaded into the parameter or buffer of the same name (`visual_encoder.*`, `text_encoder.bert.*`,
  `text_encoder.cls.predictions.*`, `vision_proj`, `text_proj`, `itm_head`, the `*_m` teacher copies,
  `image_queue`, `text_queue`, `queue_ptr`, `temp`, and `idx_queue` in retrieval checkpoints);
- `*.embeddings.position_ids` is consumed after checking it is 0..L-1 (transformers 5 keeps this
  buffer out of the state dict);
- `visual_encoder(_m).pos_embed` is resampled bicubically when the image size differs (ALBEF's
  interpolate_pos_embed: 256 px pretraining -> 384 px fine-tuning).
Keys of ours that ALBEF does not have start fresh and are reported: always the codebook, `idx_queue`
for pretraining checkpoints, and the MLM head for retrieval checkpoints (ALBEF's retrieval model is a
BertModel without it). Anything else missing or unexpected is an error listing the keys.

Retrieval checkpoints name the BERT `text_encoder.embeddings.*` (no `.bert.`); they are recognised
and mapped to `text_encoder.bert.*`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codis_lib.config import ModelConfig, TextConfig, VisionConfig
from codis_lib.model.vit import interpolate_pos_embed

__all__ = ["AlbefLoadReport", "load_albef_state_dict", "load_albef_checkpoint", "model_config_from_albef",
           "unwrap_checkpoint"]


@dataclass
class AlbefLoadReport:
    """What happened to every key: loaded, consumed (checked and dropped), resampled, or started fresh."""

    layout: str  # "pretrain" (text_encoder.bert.*) or "retrieval" (text_encoder.*)
    loaded: list[str] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Return the state dict of an ALBEF checkpoint ({'model': state_dict, ...}) or of a bare state dict."""
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"not an ALBEF state dict: entries {not_tensors[:10]} are not tensors (expected a state dict "
                         f"or ALBEF's {{'model': state_dict, ...}} checkpoint)")
    return dict(checkpoint)


def _detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """Return "pretrain" or "retrieval" from the BERT key prefix, or raise if neither is present."""
    if any(k.startswith("text_encoder.bert.") for k in state):
        return "pretrain"
    if any(k.startswith("text_encoder.embeddings.") for k in state):
        return "retrieval"
    raise ValueError("not an ALBEF state dict: no 'text_encoder.bert.*' (pretraining) or 'text_encoder.embeddings.*' "
                     f"(retrieval) keys; first keys: {list(state)[:8]}")


def load_albef_state_dict(model: torch.nn.Module, checkpoint: Mapping[str, Any], *,
                          load_queues: bool = True) -> AlbefLoadReport:
    """Load an ALBEF state dict (or {'model': state_dict}) into a CODIS model; return what happened to each key.

    load_queues=False leaves our queues (and queue_ptr) fresh, e.g. when the queue size differs.
    Raises ValueError listing missing keys, unexpected keys and shape mismatches; nothing is loaded then.
    """
    state = unwrap_checkpoint(checkpoint)
    layout = _detect_layout(state)
    report = AlbefLoadReport(layout=layout)
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key
        if layout == "retrieval":
            for prefix in ("text_encoder.", "text_encoder_m."):
                if key.startswith(prefix) and not key.startswith(prefix + "cls."):
                    new_key = prefix + "bert." + key[len(prefix):]
        if new_key.endswith("embeddings.position_ids"):
            expected = torch.arange(value.shape[-1])
            if value.reshape(-1).tolist() != expected.tolist():
                raise ValueError(f"{key}: expected positions 0..{value.shape[-1] - 1}, got other values")
            report.consumed.append(key)
            continue
        if new_key.endswith("visual_encoder.pos_embed") or new_key.endswith("visual_encoder_m.pos_embed"):
            target = ours.get(new_key)
            if target is not None and target.shape != value.shape:
                value = interpolate_pos_embed(value, target.shape[1] - 1)
                report.interpolated.append(key)
        if not load_queues and new_key in ("image_queue", "text_queue", "queue_ptr", "idx_queue"):
            report.consumed.append(key)
            continue
        mapped[new_key] = value

    fresh = {k for k in ours if k.startswith("codebook.")}
    if "idx_queue" not in mapped:
        fresh.add("idx_queue")
    if layout == "retrieval":
        fresh |= {k for k in ours if k.startswith(("text_encoder.cls.", "text_encoder_m.cls."))}
    if not load_queues:
        fresh |= {"image_queue", "text_queue", "queue_ptr", "idx_queue"}
    missing = sorted(k for k in ours if k not in mapped and k not in fresh)
    unexpected = sorted(k for k in mapped if k not in ours)
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}" for k, v in mapped.items()
              if k in ours and v.shape != ours[k].shape]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint ({len(unexpected)}): {unexpected}")
    if shapes:
        hint = " (queues: pass load_queues=False to start them fresh)" if any("queue" in s for s in shapes) else ""
        problems.append(f"shape mismatches ({len(shapes)}){hint}: {shapes}")
    if problems:
        raise ValueError(f"cannot load the ALBEF {layout} checkpoint:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        for key, value in mapped.items():
            ours[key].copy_(value.to(ours[key].dtype))
    for encoder in (model.text_encoder, model.text_encoder_m):
        encoder.tie_weights()
    report.loaded = sorted(mapped)
    report.fresh = sorted(fresh)
    return report


def load_albef_checkpoint(model: torch.nn.Module, path: str | Path, **kwargs: Any) -> AlbefLoadReport:
    """Load an ALBEF checkpoint file (e.g. ALBEF_4M.pth) into a CODIS model; see load_albef_state_dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ALBEF checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(checkpoint).__name__}")
    return load_albef_state_dict(model, checkpoint, **kwargs)


def model_config_from_albef(albef_config: Mapping[str, Any], *, mode: str = "albef",
                            codebook_size: int = 4096) -> ModelConfig:
    """Return a ModelConfig equivalent to an ALBEF config ({'bert': config_bert.json dict, 'vit': ..., ...}).

    `albef_config` holds ALBEF's top-level keys (embed_dim, queue_size, temp, momentum, alpha,
    mlm_probability, image_res) plus 'bert' (the BERT config, with fusion_layer) and optionally 'vit'
    (timm VisionTransformer arguments; ALBEF's ViT-B/16 when absent).
    """
    bert = dict(albef_config["bert"])
    vit = dict(albef_config.get("vit") or {"img_size": albef_config.get("image_res", 256), "patch_size": 16,
                                            "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4,
                                            "qkv_bias": True, "norm_eps": 1e-6, "drop_path_rate": 0.0})
    if bert.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"bert.hidden_act {bert['hidden_act']!r} is not supported (ALBEF uses exact 'gelu')")
    if "encoder_width" in bert and bert["encoder_width"] != vit["embed_dim"]:
        raise ValueError(f"bert.encoder_width {bert['encoder_width']} != vit.embed_dim {vit['embed_dim']}")
    vision = VisionConfig(image_size=int(albef_config.get("image_res", vit["img_size"])),
                          patch_size=int(vit["patch_size"]), width=int(vit["embed_dim"]), depth=int(vit["depth"]),
                          num_heads=int(vit["num_heads"]), mlp_ratio=float(vit.get("mlp_ratio", 4.0)),
                          qkv_bias=bool(vit.get("qkv_bias", True)), norm_eps=float(vit.get("norm_eps", 1e-6)),
                          drop_path_rate=float(vit.get("drop_path_rate", 0.0)))
    num_layers = int(bert["num_hidden_layers"])
    text = TextConfig(vocab_size=int(bert["vocab_size"]), hidden_size=int(bert["hidden_size"]), num_layers=num_layers,
                      fusion_layers=num_layers - int(bert["fusion_layer"]),
                      num_heads=int(bert["num_attention_heads"]), intermediate_size=int(bert["intermediate_size"]),
                      max_position_embeddings=int(bert["max_position_embeddings"]),
                      type_vocab_size=int(bert.get("type_vocab_size", 2)),
                      layer_norm_eps=float(bert.get("layer_norm_eps", 1e-12)),
                      hidden_dropout=float(bert.get("hidden_dropout_prob", 0.1)),
                      attention_dropout=float(bert.get("attention_probs_dropout_prob", 0.1)),
                      pad_token_id=int(albef_config.get("pad_token_id", bert.get("pad_token_id", 0))),
                      cls_token_id=int(albef_config.get("cls_token_id", 101)),
                      mask_token_id=int(albef_config.get("mask_token_id", 103)))
    config = ModelConfig(mode=mode, vision=vision, text=text, embed_dim=int(albef_config["embed_dim"]),
                         queue_size=int(albef_config["queue_size"]), temp=float(albef_config.get("temp", 0.07)),
                         momentum=float(albef_config.get("momentum", 0.995)),
                         alpha=float(albef_config.get("alpha", 0.4)),
                         mlm_probability=float(albef_config.get("mlm_probability", 0.15)),
                         codebook_size=codebook_size)
    return config.validate("ALBEF config")
