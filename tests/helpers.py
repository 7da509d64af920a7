"""Helpers shared by several test modules: a tiny training run's overrides, a free port, a stand-in BERT release.

They live here rather than in one test module so that importing them does not also collect (or run the
module-level setup of) another module's tests.
"""
from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

from tests.fixtures_data.corpus import small_emoji_corpus


def tiny_run_overrides(output_dir: str | os.PathLike, steps: int, **extra: object) -> list[str]:
    """Return --set values for a seconds-long CODIS run on the small emoji corpus (32 px, batch 8)."""
    root, _ = small_emoji_corpus()
    values = {"data.root": str(root), "model.vision.image_size": 32, "model.queue_size": 32, "train.batch_size": 8,
              "train.max_steps": steps, "train.log_every": 1, "train.eval.at_end": "false",
              "train.tensorboard": "false", "train.progress": "false", "train.output_dir": str(output_dir),
              # One thread: tiny matrices gain nothing from two, and OpenMP threads spinning on a busy
              # 2-core machine (pytest + notebook kernels) can make a step 10x slower.
              "train.num_threads": 1, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, for a gloo rendezvous in a test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hf_bert_like(text, num_layers: int | None = None):
    """Return a Hugging Face BertForMaskedLM (seed 0) with the sizes of TextConfig ``text``: a stand-in BERT release.

    ``num_layers`` overrides ``text.num_layers`` (a release with fewer or more layers than our encoder).
    """
    import torch  # here, not at the top: most users of this module never build a BERT
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                                      num_hidden_layers=text.num_layers if num_layers is None else num_layers,
                                      num_attention_heads=text.num_heads, intermediate_size=text.intermediate_size,
                                      max_position_embeddings=text.max_position_embeddings))


def load_script(path: str | os.PathLike):
    """Import a script that is not a package module (tools/*.py, experiments/*.py) from its file; return it."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
