"""ALBEF's released checkpoints in CODIS: the model config of an ALBEF config, and the weights' loader.

`model_config_from_albef` turns ALBEF's config files (a task YAML plus configs/config_bert.json) into a
ModelConfig. The weights (ALBEF_4M.pth, the retrieval fine-tuned checkpoints) go through
`codis_lib.model.loading`, which every checkpoint path shares: `adapt_albef` maps ALBEF's pretraining
and retrieval key layouts to ours (mostly the identity: our parameter names were chosen to be ALBEF's),
and the strict load accounts for every key. `load_albef_state_dict` and `load_albef_checkpoint` are
that module's, importable from here too.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from codis_lib.config import ModelConfig, TextConfig, VisionConfig
from codis_lib.model.loading import load_albef_checkpoint, load_albef_state_dict

__all__ = ["ALBEF_BERT_REQUIRED", "check_albef_bert_config", "model_config_from_albef", "load_albef_state_dict",
           "load_albef_checkpoint"]

# The keys of ALBEF's configs/config_bert.json the model's shape is read from (the others have defaults).
ALBEF_BERT_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "fusion_layer")


def check_albef_bert_config(bert: Any, where: str) -> None:
    """Raise a one-line ValueError naming ``where`` (a file, or a config key) and the first missing or non-integer key."""
    if not isinstance(bert, Mapping):
        raise ValueError(f"{where}: must hold a mapping (ALBEF's config_bert.json), found {type(bert).__name__}")
    missing = [key for key in ALBEF_BERT_REQUIRED if key not in bert]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (ALBEF's configs/config_bert.json has "
                         f"{', '.join(ALBEF_BERT_REQUIRED)})")
    for key in ALBEF_BERT_REQUIRED:
        if isinstance(bert[key], bool) or not isinstance(bert[key], int):
            raise ValueError(f"{where}: {key} must be an integer, found {bert[key]!r}")


def model_config_from_albef(albef_config: Mapping[str, Any], *, mode: str = "albef",
                            codebook_size: int = 4096) -> ModelConfig:
    """Return a ModelConfig equivalent to an ALBEF config ({'bert': config_bert.json dict, 'vit': ..., ...}).

    `albef_config` holds ALBEF's top-level keys (embed_dim, queue_size, temp, momentum, alpha,
    mlm_probability, image_res) plus 'bert' (the BERT config, with fusion_layer) and optionally 'vit'
    (timm VisionTransformer arguments; ALBEF's ViT-B/16 when absent).
    """
    for key in ("bert", "embed_dim", "queue_size"):
        if key not in albef_config:
            raise ValueError(f"ALBEF config: missing key {key!r}")
    check_albef_bert_config(albef_config["bert"], "ALBEF config: bert")
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
