"""Named model sizes. The YAML files in ``conf/model/`` are the single source of truth: Hydra composes
them as the ``model`` group, and :func:`load_model_config` reads the same files outside Hydra."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from picomaml.model.pico_decoder import ModelConfig

PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def preset_names() -> list[str]:
    """Names of the presets in ``conf/model`` (e.g. ``['11m', '181m', ..., 'tiny']``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_model_config(name: str, **overrides: object) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name``, with fields replaced by ``overrides``.

    Raises ``ValueError`` naming the valid presets for an unknown name, and the valid fields for an
    unknown override key.
    """
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; valid names: {', '.join(preset_names())}")
    values = yaml.safe_load(path.read_text())
    values.pop("_target_", None)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {', '.join(sorted(fields))}")
    return ModelConfig(**{**values, **overrides})
