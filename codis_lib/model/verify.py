"""Refuse to train from an initialisation that did not fully arrive: every tensor the source gives must be there.

The loaders are strict (`codis_lib.model.loading.load_state_strict`: missing or unexpected keys are
errors), but a strict load is one step of several between a config key and the first training step:
the report can be dropped on the floor, the weights loaded into a module the model does not use, the
teacher left as it was built, a tensor re-initialised afterwards, or a loader may hand back a report
with nothing loaded. A from-scratch reproduction that silently lost its DeiT weights came out 12 points
short, and nothing in its logs said so.

`verify_load(report, module, config_key=...)` is the one check, generic over `LoadReport`s (every loader
that returns one can be verified the same way): every tensor of `module` that the report does not list
as deliberately fresh (with its reason) must be among the loaded keys and still hold the value that went
in (`LoadReport.fingerprints`, recorded by `load_state_strict`: a float64 sum and evenly spread
elements). Otherwise `InitialisationError`, a ValueError with one line naming the config key, the source,
the module and the first tensors that did not come from it: the training command exits with status 2.
`verify_pretrained(model, config)` applies it to the encoders `model.vision.pretrained` /
`model.text.pretrained` name, student and teacher both.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from codis_lib.model.loading import LoadReport, tensor_fingerprint

__all__ = ["InitialisationError", "verify_load", "verify_pretrained", "PRETRAINED_TARGETS"]

SHOWN = 5  # tensors named in a refusal

# config key -> (ModelConfig section, the model's modules that must hold the source's tensors: student, teacher)
PRETRAINED_TARGETS = {
    "model.vision.pretrained": ("vision", ("visual_encoder", "visual_encoder_m")),
    "model.text.pretrained": ("text", ("text_encoder", "text_encoder_m")),
}


class InitialisationError(ValueError):
    """An initialisation the config asks for did not load every tensor it should have; training is refused."""


def _same(expected: Sequence[float], actual: Sequence[float]) -> bool:
    """Return whether two fingerprints agree: samples exactly, sums up to float64 reduction-order rounding."""
    if len(expected) != len(actual):
        return False
    sum_ok = math.isclose(expected[0], actual[0], rel_tol=1e-9, abs_tol=1e-9 * max(1.0, abs(expected[0])))
    return sum_ok and all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(expected[1:], actual[1:]))


def verify_load(report: LoadReport, module: torch.nn.Module, *, config_key: str, target: str = "the model",
                source_state: Mapping[str, torch.Tensor] | None = None) -> int:
    """Return how many tensors of `module` were checked against `report`; raise InitialisationError if one fails.

    Expected from the source: every key of `module.state_dict()` that `report.fresh` does not list. Each
    must be in `report.loaded` and equal the value loaded: its fingerprint in `report.fingerprints`, or
    for a loader that records none, the tensor of `source_state` (the source in the module's layout).
    """
    ours = module.state_dict()
    expected = [key for key in ours if key not in report.fresh]
    loaded = set(report.loaded)
    head = f"{config_key}: refusing to start, {report.source} did not initialise {target}"
    if not loaded:
        raise InitialisationError(f"{head}: the load reports 0 tensors loaded (of {len(expected)} expected)")
    not_loaded = [key for key in expected if key not in loaded]
    if not_loaded:
        raise InitialisationError(f"{head}: {len(not_loaded)} of {len(expected)} tensors were not loaded, first "
                                  f"{', '.join(not_loaded[:SHOWN])}")
    differ, unverifiable = [], []
    for key in expected:
        value = ours[key]
        if key in report.fingerprints:
            reference = report.fingerprints[key]
        elif source_state is not None and key in source_state:
            reference = tensor_fingerprint(source_state[key].to(value.dtype))
        else:
            unverifiable.append(key)
            continue
        if not _same(reference, tensor_fingerprint(value)):
            differ.append(key)
    if differ:
        raise InitialisationError(f"{head}: {len(differ)} of {len(expected)} tensors do not hold the source's values "
                                  f"(overwritten or never copied after the load), first {', '.join(differ[:SHOWN])}")
    if unverifiable:
        raise InitialisationError(f"{head}: the load report records no values for {len(unverifiable)} tensors "
                                  f"(load through load_state_strict, or pass source_state), first "
                                  f"{', '.join(unverifiable[:SHOWN])}")
    return len(expected)


def verify_pretrained(model: torch.nn.Module, config) -> int:
    """Return the tensors checked after `build_model`: each pretrained encoder the config names, in student and teacher.

    `config` is the ModelConfig the model was built from. A key that is set but has no load report on the
    model (`model.pretrained_loads`, filled by `codis_lib.model.pretrained.initialise_pretrained`) is refused too:
    the weights never reached the model.
    """
    loads = getattr(model, "pretrained_loads", {})
    checked = 0
    for config_key, (section, modules) in PRETRAINED_TARGETS.items():
        source = getattr(config, section).pretrained
        if not source:
            continue
        report = loads.get(config_key)
        if report is None:
            raise InitialisationError(f"{config_key}: refusing to start, it names {source!r} but no weights were "
                                      f"loaded into the model (it was built without them)")
        for name in modules:
            if hasattr(model, name):  # clip mode has no teacher
                checked += verify_load(report, getattr(model, name), config_key=config_key, target=name)
    return checked
