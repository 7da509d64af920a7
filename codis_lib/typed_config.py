"""Typed configs read from YAML: dataclasses filled strictly, every error naming its dotted key and its file.

The model config (`codis_lib.config`) and the run config (`codis_lib.run_config`) are dataclasses whose
type hints are the schema. This module turns a nested mapping (read from YAML, or written by hand)
into such a dataclass and refuses what does not fit:

    build_dataclass(TrainConfig, {"batch_size": 8}, "my.yaml", "train.")   # TrainConfig(batch_size=8, ...)
    build_dataclass(TrainConfig, {"batch_sise": 8}, "my.yaml", "train.")
    # ConfigError: my.yaml: unknown key(s) train.batch_sise in train; valid keys: ...

What a hint accepts (`check_type`): bool only true/false, int only integers (not bools), float any
number (and a string that is a float literal, since PyYAML reads `1e-6` as a string), str strings,
Literal its listed values, `X | None` None or an X, a union of several types the first alternative
that accepts the value, lists item by item, and a nested dataclass key by key (its keys dotted
under the parent's). `deep_merge` lays a partial mapping over a full one (a preset), section by
section; `read_yaml` reads a file, naming it when the YAML is broken (one line, with the position), and
`read_yaml_mapping` also when it holds no mapping.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

__all__ = ["ConfigError", "read_yaml", "read_yaml_mapping", "yaml_problem", "deep_merge", "build_dataclass",
           "check_type"]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


def read_yaml(path: Path) -> Any:
    """Return the parsed contents of the YAML file `path` (None for an empty file); ConfigError naming it if broken.

    The error is one line: the file, the line and column PyYAML stopped at, and what it expected there.
    """
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML{yaml_problem(error)}") from error


def read_yaml_mapping(path: Path) -> dict:
    """Return the mapping in the YAML file `path` ({} for an empty file); ConfigError naming the file otherwise."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        shown = " ".join(repr(data).split())
        raise ConfigError(f"{path}: a config file must hold a mapping of sections (key: value), found "
                          f"{type(data).__name__} {shown[:60]}{'...' if len(shown) > 60 else ''}")
    return dict(data)


def yaml_problem(error: yaml.YAMLError) -> str:
    """Return " at line L, column C: what went wrong" (1-based) for a PyYAML error, in one line."""
    mark = getattr(error, "problem_mark", None)
    problem = " ".join(str(getattr(error, "problem", None) or error).split())
    context = getattr(error, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}" + (f" ({' '.join(str(context).split())})" if context else "")


def deep_merge(base: dict, update: Mapping) -> dict:
    """Return base updated by `update`, merging nested mappings key by key."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_dataclass(cls: type, data: Mapping[str, Any], source: str, prefix: str) -> Any:
    """Return cls(**checked values) after rejecting unknown keys and wrong types, naming the dotted key.

    Shared by every typed config of the package (the model's in codis_lib.config, the data and training
    sections in codis_lib.run_config). `prefix` is the dotted path of this section ("train." ...), `source`
    the file (or "<dict>") the messages name.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in valid]
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + str(k) for k in unknown)} in {where}; "
                          f"valid keys: {', '.join(valid)}")
    return cls(**{key: check_type(hints[key], raw, f"{prefix}{key}", source) for key, raw in data.items()})


def check_type(hint: Any, value: Any, key: str, source: str) -> Any:
    """Return value converted to `hint` (int -> float allowed), or raise ConfigError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none, errors = [a for a in args if a is not type(None)], []
        if len(non_none) == 1:
            return check_type(non_none[0], value, key, source)
        for alternative in non_none:  # e.g. int | Literal["auto"]: the first alternative that accepts the value
            try:
                return check_type(alternative, value, key, source)
            except ConfigError as error:  # keep what this alternative expected
                errors.append(str(error).split(f"{key} ", 1)[-1])
        raise ConfigError(f"{source}: {key} {' or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r} ({type(value).__name__})")
        return [check_type(args[0], item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if hint is float:
        # PyYAML reads "1e-6" (no dot) as a string; accept any string that is a float literal.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"{source}: {key} has unsupported type {hint}")  # a bug in this module, not in the file
