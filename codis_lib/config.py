"""Typed configuration of the CODIS model: dataclasses, presets and validated YAML loading.

A `ModelConfig` describes everything `codis_lib.model.build_model` needs: the image encoder
(`VisionConfig`: ALBEF's ViT, or ImageNet EfficientNet-Lite0), the BERT text + fusion encoder (`TextConfig`), the mode ("clip" | "albef" |
"codis"), the loss switches and weights (`LossConfig`) and the scalars of docs/METHOD.md (temperature,
momentum, queue, codebook, Sinkhorn, MLM masking).

Presets ship as YAML files beside this module (`codis_lib/configs/tiny.yaml`, `base.yaml`):

    >>> cfg = ModelConfig.preset("tiny")
    >>> cfg = load_model_config("my_model.yaml")              # a full or partial config
    >>> cfg = ModelConfig.from_dict({"preset": "tiny", "mode": "albef"})
    >>> cfg = cfg.with_overrides({"losses.itm": False, "queue_size": 256})

Loading is strict (the typed-YAML machinery of `codis_lib.typed_config`): unknown keys (listing the
valid ones), wrong types and impossible combinations are errors that name the key and the file. The
one check that needs the batch size (the queue length must be a multiple of the global batch, because
the queue is refreshed FIFO one global batch at a time) is `ModelConfig.validate_for_batch(global_batch)`,
which the trainer calls.

Mode and loss switches: the mode fixes which parts exist in the computation.
- clip:  in-batch image-text contrastive loss only (no teacher, no queue, no fusion losses);
- albef: ALBEF = image-text contrastive with momentum distillation over the queue + ITM + MLM;
- codis: albef + the unimodal teacher-student pair (i2i, t2t) + L_code + L_ot.
Each switch in `losses` is `None` (use the mode's default), `true` or `false`; switching on a term
its mode cannot compute (e.g. `itm` in clip) is an error, switching one off is an ablation.

Teacher views (modes albef and codis; clip has no teacher): `teacher_view` "same" (ALBEF), "own" (a
second draw of the training augmentation, as TCL's `image_aug`, carried as `batch["image_teacher"]`) or
"other_drawing" (another training image with the record's very captions: on the emoji corpus the emoji's
drawing in the other art family; the record's own image where it has none), also `batch["image_teacher"]`;
`teacher_text_view` "same" (ALBEF), "dropout" (the same caption, the views differing by dropout masks
as in TCL; an error when the text dropout is 0) or "other_caption" (another caption of the record).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from codis_lib.typed_config import ConfigError, build_dataclass, deep_merge, read_yaml_mapping

# ConfigError (defined in codis_lib.typed_config) is what every loader here raises.
__all__ = ["VisionConfig", "TextConfig", "LossConfig", "ModelConfig", "ConfigError", "load_model_config",
           "preset_names", "config_from_dict", "MODES", "LOSS_TERMS"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODES = ("clip", "albef", "codis")
LOSS_TERMS = ("align", "align_unimodal", "code", "ot", "itm", "mlm")

# Which loss terms each mode can compute (and therefore switches on by default).
_MODE_LOSSES: dict[str, tuple[str, ...]] = {
    "clip": ("align",),
    "albef": ("align", "itm", "mlm"),
    "codis": ("align", "align_unimodal", "code", "ot", "itm", "mlm"),
}
_WHY_NOT = {
    "clip": "clip mode has no teacher, queue, codebook or fusion encoder in its computation",
    "albef": "albef mode has no codebook and no unimodal teacher-student pair (use mode 'codis')",
}


@dataclass
class VisionConfig:
    """ViT image encoder (timm VisionTransformer, pre-norm, qkv bias, exact GELU, no head)."""

    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    # None: random init (offline). "deit_base_patch16_224": timm weights from the hub (online only).
    # Any other string: a local file (.pth/.pt/.bin/.safetensors) holding a timm/DeiT state dict.
    # With backbone efficientnet_lite0: "imagenet" (the packaged ImageNet weights, offline) or such a file.
    pretrained: str | None = None
    # "vit": ALBEF's ViT. "efficientnet_lite0": the stride-16 map of EfficientNet-Lite0 as image tokens
    # (codis_lib.model.efficientnet); patch_size, depth, num_heads and mlp_ratio then do not apply.
    backbone: Literal["vit", "efficientnet_lite0"] = "vit"
    backbone_size: int | None = None  # efficientnet: images resized to this side first (None: image_size)
    trunk_stages: int = 5  # efficientnet: the first N of its 7 stages make the map (5: stride 16, 112 channels;
                           # 7: stride 32, 320 channels, ImageNet's last stage before its classifier head)
    freeze_blocks: int = 0  # efficientnet: the stem and the first N of its trunk stages keep ImageNet's weights
    cache_trunk: bool = True  # efficientnet with every trunk stage frozen: each image's feature map computed once

    @property
    def grid_size(self) -> int:
        """Return the number of patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Return the number of image tokens (patches + CLS)."""
        return self.grid_size ** 2 + 1


@dataclass
class TextConfig:
    """BERT text encoder (layers 0..N-F-1) and fusion encoder (last F layers with cross-attention)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12  # total BERT layers N (text + fusion)
    fusion_layers: int = 6  # F: the last F layers cross-attend to the image tokens
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    unk_token_id: int = 100
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    # "sdpa": PyTorch scaled_dot_product_attention (fast); "eager": explicit softmax(QK^T)V.
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # True: the text and fusion layers compute their per-token products over the real tokens only
    # (codis_lib/model/unpadded.py; same values at the real positions, about half the work on the emoji
    # captions); needs sdpa. False: the padded layers (the paper's path; torch.compile compiles whole layers).
    unpad: bool = False
    # None: random init (offline). "bert-base-uncased" (or another hub name): from the hub (online only).
    # A local directory saved with save_pretrained, or a state-dict file, works offline.
    pretrained: str | None = None

    @property
    def text_layers(self) -> int:
        """Return the number of text-only layers N - F."""
        return self.num_layers - self.fusion_layers


@dataclass
class LossConfig:
    """Per-term switches (None = the mode's default) and weights of L = sum_k w_k L_k."""

    align: bool | None = None  # image-text teacher-student alignment (ALBEF's ITC: t2i + i2t)
    align_unimodal: bool | None = None  # the unimodal pair i2i + t2t of L_align (CODIS)
    code: bool | None = None  # L_code = L_t2p + L_i2p
    ot: bool | None = None  # L_ot (moves the codebook only)
    itm: bool | None = None  # image-text matching with hard negatives
    mlm: bool | None = None  # masked language modelling with image cross-attention
    align_weight: float = 1.0
    align_unimodal_weight: float = 1.0
    code_weight: float = 1.0
    ot_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0


@dataclass
class ModelConfig:
    """Everything that defines a CODIS model; the defaults are the paper's base size."""

    mode: Literal["clip", "albef", "codis"] = "codis"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    embed_dim: int = 256  # d: width of the contrastive projections and the codebook
    queue_size: int = 65536  # Q: teacher features kept per modality
    temp: float = 0.07  # initial contrastive temperature tau (learnable)
    temp_min: float = 0.001  # tau is clamped to [temp_min, temp_max] at every forward
    temp_max: float = 0.5
    learn_temp: bool = True  # False: tau stays at its initial value (requires_grad off, not in the optimizer)
    # Columns that i2t / t2i score the student against for the global batch: "teacher" (ALBEF and CODIS: the
    # momentum features, no gradient through them) or "student" (the student's own features with gradient, as
    # CLIP; the teacher still gives the soft targets and the queue). See docs/METHOD.md, "Alignment columns".
    align_columns: str = "teacher"
    momentum: float = 0.995  # EMA momentum m of the teacher
    alpha: float = 0.4  # distillation weight reached after the ramp (the trainer passes alpha to forward)
    codebook_size: int = 4096  # K (the paper leaves it open; our choice)
    codebook_temperature: float = 0.1  # tau_c of p = softmax(z C^T / tau_c)
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    sinkhorn_log_domain: bool = False
    mlm_probability: float = 0.15
    gradient_checkpointing: bool = False  # recompute encoder activations in backward (saves memory)
    # What the momentum teacher encodes (module docstring, README); ignored in clip mode (no teacher).
    teacher_view: Literal["same", "own", "other_drawing"] = "same"  # image: the student's augmented image, its own
    # draw, or another drawing of the same captions (module docstring)
    teacher_text_view: Literal["same", "dropout", "other_caption"] = "same"  # caption: the same, or another

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """Return the packaged preset `name` ("tiny" or "base"), validated."""
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(preset_names())}")
        return load_model_config(path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "ModelConfig":
        """Return a validated ModelConfig from a (possibly partial) mapping; see `config_from_dict`."""
        return config_from_dict(data, source)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain nested dict (YAML/JSON/checkpoint friendly) that from_dict reads back."""
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any] | None = None, **top_level: Any) -> "ModelConfig":
        """Return a validated copy with dotted-key overrides, e.g. {"text.vocab_size": 3000, "mode": "albef"}."""
        data = self.to_dict()
        merged = dict(overrides or {})
        merged.update(top_level)
        for dotted, value in merged.items():
            node = data
            parts = dotted.split(".")
            for depth, part in enumerate(parts):
                if not isinstance(node, dict) or part not in node:
                    where = ".".join(parts[:depth]) or "<top level>"
                    valid = sorted(node) if isinstance(node, dict) else []
                    raise ConfigError(f"override {dotted!r}: no key {part!r} under {where}; valid keys: "
                                      f"{', '.join(valid)}")
                if depth == len(parts) - 1:
                    node[part] = copy.deepcopy(value)
                else:
                    node = node[part]
        return config_from_dict(data, source="<overrides>")

    def with_tokenizer(self, tokenizer: Any) -> "ModelConfig":
        """Return a copy whose vocab_size and special token ids come from a Hugging Face tokenizer."""
        ids = {}
        for key, token_attr in (("pad_token_id", "pad_token_id"), ("unk_token_id", "unk_token_id"),
                                ("cls_token_id", "cls_token_id"), ("sep_token_id", "sep_token_id"),
                                ("mask_token_id", "mask_token_id")):
            value = getattr(tokenizer, token_attr, None)
            if value is None:
                raise ConfigError(f"tokenizer has no {token_attr}; the model needs [PAD], [UNK], [CLS], [SEP] and "
                                  f"[MASK] special tokens")
            ids[f"text.{key}"] = int(value)
        ids["text.vocab_size"] = len(tokenizer)
        return self.with_overrides(ids)

    # ------------------------------------------------------------------ derived views
    def active_losses(self) -> dict[str, bool]:
        """Return {term: on/off} for every loss term after resolving the mode defaults."""
        supported = _MODE_LOSSES[self.mode]
        resolved = {}
        for term in LOSS_TERMS:
            switch = getattr(self.losses, term)
            resolved[term] = (term in supported) if switch is None else bool(switch)
        return resolved

    def loss_weights(self) -> dict[str, float]:
        """Return the weight of every loss term."""
        return {term: float(getattr(self.losses, f"{term}_weight")) for term in LOSS_TERMS}

    @property
    def uses_teacher(self) -> bool:
        """Return True when the momentum teacher and the queues take part (modes albef and codis)."""
        return self.mode != "clip"

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "<config>") -> "ModelConfig":
        """Return self after checking value ranges and impossible combinations (ConfigError naming the key)."""
        errors: list[str] = []

        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                errors.append(f"{key}: {message}")

        v, t, lo = self.vision, self.text, self.losses
        for key, value in (("vision.image_size", v.image_size), ("vision.patch_size", v.patch_size),
                           ("vision.width", v.width), ("vision.depth", v.depth), ("vision.num_heads", v.num_heads),
                           ("text.vocab_size", t.vocab_size), ("text.hidden_size", t.hidden_size),
                           ("text.num_layers", t.num_layers), ("text.num_heads", t.num_heads),
                           ("text.intermediate_size", t.intermediate_size),
                           ("text.max_position_embeddings", t.max_position_embeddings),
                           ("text.type_vocab_size", t.type_vocab_size), ("embed_dim", self.embed_dim),
                           ("queue_size", self.queue_size), ("codebook_size", self.codebook_size),
                           ("sinkhorn_iters", self.sinkhorn_iters)):
            need(value >= 1, key, f"must be >= 1, got {value}")
        need(v.image_size % v.patch_size == 0, "vision.image_size",
             f"{v.image_size} is not a multiple of vision.patch_size {v.patch_size}")
        need(v.width % v.num_heads == 0, "vision.num_heads",
             f"vision.width {v.width} is not divisible by vision.num_heads {v.num_heads}")
        need(v.mlp_ratio > 0, "vision.mlp_ratio", f"must be > 0, got {v.mlp_ratio}")
        need(v.norm_eps > 0, "vision.norm_eps", f"must be > 0, got {v.norm_eps}")
        need(0.0 <= v.drop_path_rate < 1.0, "vision.drop_path_rate", f"must be in [0, 1), got {v.drop_path_rate}")
        need(t.hidden_size % t.num_heads == 0, "text.num_heads",
             f"text.hidden_size {t.hidden_size} is not divisible by text.num_heads {t.num_heads}")
        need(not t.unpad or t.attn_implementation == "sdpa", "text.unpad",
             f"needs text.attn_implementation sdpa, got {t.attn_implementation!r}")
        need(t.fusion_layers >= 1, "text.fusion_layers", f"must be >= 1 (ITM and MLM need a fusion encoder), "
             f"got {t.fusion_layers}")
        need(t.fusion_layers < t.num_layers, "text.fusion_layers",
             f"{t.fusion_layers} fusion layers but text.num_layers is {t.num_layers}: at least one text-only layer "
             f"must remain (text.fusion_layers <= text.num_layers - 1)")
        need(t.layer_norm_eps > 0, "text.layer_norm_eps", f"must be > 0, got {t.layer_norm_eps}")
        for key, p in (("text.hidden_dropout", t.hidden_dropout), ("text.attention_dropout", t.attention_dropout)):
            need(0.0 <= p < 1.0, key, f"must be in [0, 1), got {p}")
        special = {name: getattr(t, name) for name in
                   ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id")}
        for name, token_id in special.items():
            need(0 <= token_id < t.vocab_size, f"text.{name}",
                 f"{token_id} is outside the vocabulary [0, text.vocab_size={t.vocab_size})")
        if len(set(special.values())) != len(special):
            errors.append(f"text.*_token_id: special token ids must be distinct, got {special}")
        need(0 < self.temp_min < self.temp_max, "temp_min",
             f"need 0 < temp_min < temp_max, got temp_min={self.temp_min}, temp_max={self.temp_max}")
        need(self.align_columns in ("teacher", "student"), "align_columns",
             f"must be 'teacher' or 'student', got {self.align_columns!r}")
        need(self.temp_min <= self.temp <= self.temp_max, "temp",
             f"{self.temp} is outside [temp_min, temp_max] = [{self.temp_min}, {self.temp_max}]")
        need(0.0 <= self.momentum <= 1.0, "momentum", f"must be in [0, 1], got {self.momentum}")
        need(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        need(self.codebook_temperature > 0, "codebook_temperature", f"must be > 0, got {self.codebook_temperature}")
        need(self.sinkhorn_eps > 0, "sinkhorn_eps", f"must be > 0, got {self.sinkhorn_eps}")
        need(0.0 < self.mlm_probability < 1.0, "mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")
        supported = _MODE_LOSSES[self.mode]
        for term in LOSS_TERMS:
            if getattr(lo, term) is True and term not in supported:
                errors.append(f"losses.{term}: cannot be switched on in mode {self.mode!r} ({_WHY_NOT[self.mode]}); "
                              f"terms available in this mode: {', '.join(supported)}")
            weight = getattr(lo, f"{term}_weight")
            need(weight >= 0 and math.isfinite(weight), f"losses.{term}_weight",
                 f"must be finite and >= 0, got {weight}")
        active = self.active_losses()
        if not any(active.values()):
            errors.append(f"losses: every loss term is switched off in mode {self.mode!r}; nothing to train")
        if active["align_unimodal"] and not active["align"]:
            errors.append("losses.align_unimodal: the unimodal pair (i2i, t2t) is part of L_align; it needs "
                          "losses.align on")
        for key in ("teacher_view", "teacher_text_view"):  # the Literal values, also for configs built directly
            valid = typing.get_args(typing.get_type_hints(ModelConfig)[key])
            need(getattr(self, key) in valid, key, f"must be one of {', '.join(valid)}, got {getattr(self, key)!r}")
        need(self.teacher_text_view != "dropout" or max(t.hidden_dropout, t.attention_dropout) > 0, "teacher_text_view",
             "'dropout' needs text dropout, but text.hidden_dropout and text.attention_dropout are 0")
        if errors:
            raise ConfigError(f"invalid model config ({source}):\n  " + "\n  ".join(errors))
        return self

    def validate_for_batch(self, global_batch: int) -> None:
        """Raise ConfigError unless this config can train with `global_batch` samples per step (all ranks)."""
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
            raise ConfigError(f"global_batch must be a positive integer, got {global_batch!r}")
        active = self.active_losses()
        if self.uses_teacher and self.queue_size % global_batch != 0:
            raise ConfigError(
                f"queue_size: {self.queue_size} is not divisible by the global batch {global_batch} (batch per "
                f"process x processes); the queue is refreshed FIFO one global batch at a time. Choose queue_size "
                f"as a multiple of {global_batch}, e.g. {max(1, self.queue_size // global_batch) * global_batch}")
        if active["itm"] and global_batch < 2:
            raise ConfigError("losses.itm: hard negatives need at least 2 samples in the global batch, got 1")


# ---------------------------------------------------------------------- YAML / dict loading
def preset_names() -> list[str]:
    """Return the names of the packaged presets (the YAML files in codis_lib/configs/ with a model config)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem in ("tiny", "base"))


def load_model_config(path: str | Path) -> ModelConfig:
    """Return the validated ModelConfig stored in a YAML file (full, partial, or starting with `preset:`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model config file {path} does not exist")
    data = read_yaml_mapping(path)
    return config_from_dict(data, source=str(path))


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> ModelConfig:
    """Return a validated ModelConfig from a nested mapping.

    Missing keys keep the dataclass defaults (the base size). A top-level `preset: tiny` starts from
    that preset instead and applies the remaining keys on top (nested sections merge key by key).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a model config must be a mapping of keys to values, got {type(data).__name__}")
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{source}: preset must be a preset name string, got {preset!r}")
        base = ModelConfig.preset(preset).to_dict()
        data = deep_merge(base, data)
    config = build_dataclass(ModelConfig, data, source, prefix="")
    return config.validate(source)

