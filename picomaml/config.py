"""Config plumbing shared by the entry points: resolvers, checked instantiation, clear errors.

Every section of the composed config becomes a typed object (a dataclass or a Lightning object) before
any training starts, so a typo'd key or an out-of-range value fails with one message that names it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import types
import typing
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# The configs ship inside the package, so an installed wheel composes the same runs as a checkout.
CONF_DIR = Path(__file__).resolve().parent / "conf"
BASE_OPTION = "base"


class ConfigError(ValueError):
    """A bad config value or key, found before training. The message names the key and what is allowed."""


def register_resolvers() -> None:
    """Resolvers used by conf/hydra/default.yaml (idempotent: Hydra may import us more than once)."""
    if not OmegaConf.has_resolver("picomaml.uniq"):
        # 6 hex digits: two sweeps started in the same second still get different directories
        OmegaConf.register_new_resolver("picomaml.uniq", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("picomaml.run_name"):
        OmegaConf.register_new_resolver("picomaml.run_name", run_dir_name)


def run_dir_name(run_name: str | None, override_dirname: str) -> str:
    """The run dir's name: `run_name` if given, else the command's overrides, else `default`.

    Slashes (paths in overrides) become underscores; a name too long for a file system keeps its
    first 80 characters and a hash of the rest, so distinct commands keep distinct dirs.
    """
    name = str(run_name) if run_name else override_dirname or "default"
    name = name.replace("/", "_")
    if len(name) > 120:
        name = f"{name[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def group_options(group: str) -> list[str]:
    """The names a user can pick in a config group, e.g. `group_options("model")` -> ['11m', ...]."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def base_node(schema: type) -> dict[str, Any]:
    """A group's `base` option: `_target_` plus every field of the dataclass `schema` at its default.

    The dataclass is the one source of the defaults; the YAML options of the group list `base` first
    in their defaults and state only what differs, so every key exists (and can be swept) in every
    option, and an unknown key is still an error.
    """
    values = dataclasses.asdict(schema())
    return {"_target_": f"{schema.__module__}.{schema.__qualname__}", **values}


def register_bases(schemas: dict[str, type]) -> None:
    """Store `<group>/base` in Hydra's ConfigStore for each `group: dataclass` (idempotent)."""
    store = ConfigStore.instance()
    for group, schema in schemas.items():
        store.store(group=group, name=BASE_OPTION, node=base_node(schema))


def load_option(group: str, name: str, schema: type, **overrides: Any) -> Any:
    """`conf/<group>/<name>.yaml` as an instance of `schema`, outside Hydra (as Hydra composes it:
    the `base` defaults first, then the file, then `overrides`). Raises ValueError for an unknown name."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown {group} config {name!r}; valid names: {', '.join(group_options(group))}")
    option = OmegaConf.to_container(OmegaConf.load(path))
    defaults = option.pop("defaults", [])
    values = base_node(schema) if BASE_OPTION in defaults else {}
    values.update(option)
    values.pop("_target_", None)
    return schema(**{**values, **overrides})


def instantiate_section(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(cfg[key])`, turning the many ways it can fail into one ConfigError."""
    section = cfg.get(key)
    if section is None:
        raise ConfigError(f"config section '{key}' is missing (options: {', '.join(group_options(key))})")
    target = section.get("_target_")
    schema = hydra.utils.get_class(target) if target else None
    if schema is not None and dataclasses.is_dataclass(schema):
        check_types(schema, OmegaConf.to_container(section, resolve=True), key)
    try:
        return hydra.utils.instantiate(section, _convert_="all", **kwargs)
    except Exception as err:  # hydra wraps the constructor's error; report the innermost cause
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ConfigError(f"{key}: {_describe(cause)}") from err


def check_types(schema: type, values: dict[str, Any], prefix: str) -> None:
    """Raise ConfigError for the first value of `values` that does not fit its field of `schema`, named
    `<prefix>.<field>` with the expected type (a typo'd number would otherwise fail deep in a comparison).
    Unknown keys are left to the constructor's own error."""
    hints = typing.get_type_hints(schema)
    for name, value in values.items():
        if name in hints and not _fits(value, hints[name]):
            raise ConfigError(
                f"{prefix}.{name}={value!r}: expected {_type_name(hints[name])}, got {type(value).__name__}"
            )


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else True
    if hint is float:  # an int is a fine float; a bool is not a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        inner = typing.get_args(hint)
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(inner[0], _type_name(inner[0]))}" if inner else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
    )


def _describe(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, TypeError) and "unexpected keyword argument" in text:
        name = text.split("unexpected keyword argument")[-1].strip(" '\"")
        return f"unknown key '{name}'"
    return text


def resolve_precision(precision: str | int, accelerator: str) -> str:
    """Map `auto` to the fast, safe precision of this device: bf16-mixed on bf16 GPUs and AMX CPUs."""
    if str(precision) != "auto":
        return str(precision)
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_amx_bf16() else "32-true"


def cpu_has_amx_bf16() -> bool:
    """True on CPUs with AMX bf16 tiles, where bf16 matmuls run several times faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags
