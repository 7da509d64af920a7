"""The CODIS model: ViT image encoder, BERT text + fusion encoder, momentum teacher, queues and codebook.

`build_model(config)` returns a randomly initialised `CODIS` (offline); pretrained encoders are
opt-in through `config.vision.pretrained` / `config.text.pretrained` (see `codis_lib.model.pretrained`).
"""
from __future__ import annotations

from codis_lib.config import ModelConfig
from codis_lib.model.codis import CODIS, CODISOutput

__all__ = ["build_model", "CODIS", "CODISOutput"]


def build_model(config: ModelConfig, *, initialise: bool = True) -> CODIS:
    """Return a CODIS model for `config`: random init, or pretrained encoders where the config asks for them.

    initialise=False skips the pretrained encoders (for a model whose weights a checkpoint replaces next:
    evaluating a run started from BERT then needs neither the hub nor the packaged model).
    """
    from codis_lib.model.pretrained import initialise_pretrained  # noqa: PLC0415 (hub code only when asked for)

    model = CODIS(config)
    if initialise and (config.vision.pretrained or config.text.pretrained):
        initialise_pretrained(model, config)
    return model
