"""Named model sizes. The YAML files in ``conf/model/`` (inside the package) are the single source of
truth: Hydra composes them as the ``model`` group, and :func:`load_model_config` reads the same files
outside Hydra."""

from __future__ import annotations

import dataclasses

from picomaml.config import group_options, load_option
from picomaml.model.pico_decoder import ModelConfig


def preset_names() -> list[str]:
    """Names of the presets in ``conf/model`` (e.g. ``['11m', '181m', ..., 'tiny']``)."""
    return group_options("model")


def load_model_config(name: str, **overrides: object) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name``, with fields replaced by ``overrides``.

    Raises ``ValueError`` naming the valid presets for an unknown name, and the valid fields for an
    unknown override key.
    """
    if name not in preset_names():
        raise ValueError(f"unknown model preset {name!r}; valid names: {', '.join(preset_names())}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {', '.join(sorted(fields))}")
    return load_option("model", name, ModelConfig, **overrides)
