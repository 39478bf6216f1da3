"""Load a trained run back: the one place that knows how a run directory and its checkpoints look.

A run directory (what ``python -m picomaml.train`` writes)::

    <run>/training_config.yaml              the full resolved Hydra config (data, model, meta, ...)
    <run>/csv/metrics.csv                   Lightning CSV metrics
    <run>/checkpoints/last.ckpt             Lightning checkpoint after the last save
    <run>/checkpoints/latest -> step_<N>    the newest step directory
    <run>/checkpoints/step_<N>/checkpoint.ckpt          the Lightning checkpoint of step N
    <run>/checkpoints/step_<N>/{config.json,model.safetensors,...}   its LlamaForCausalLM export
    <run>/checkpoints/step_<N>/learning_dynamics/...   pico-train's learning-dynamics dumps

(see ``picomaml.lit.checkpointing``). :func:`load_run` accepts any of ``<run>``, a ``.ckpt`` file, or a
``checkpoints/step_<N>`` (or ``checkpoints/latest``) directory and
rebuilds the backbone (and the meta head of a meta run) from the checkpoint's ``state_dict``
(backbone under ``model.``, head under ``meta_head.``) and ``hyper_parameters`` (``model_config``,
``meta_config``). The evaluate/generate/analyze CLIs all start here, and share
:func:`parse_cli_args` for their ``key=value`` arguments.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from picomaml.lit.checkpointing import CHECKPOINT_FILE, LAST_FILE, LATEST_LINK
from picomaml.meta import MetaConfig, MetaHead
from picomaml.model import ModelConfig, PicoDecoder

TRAINING_CONFIG = "training_config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class RunError(ValueError):
    """A path that is not a loadable picomaml run, with a message saying what is missing."""


@dataclass
class LoadedRun:
    """A checkpoint of a run, rebuilt: models in eval mode on the CPU, configs as typed objects.

    ``meta_head`` and ``meta_config`` are None for a plain AR run (no ``meta_head.`` weights saved).
    """

    model: PicoDecoder
    meta_head: MetaHead | None
    model_config: ModelConfig
    meta_config: MetaConfig | None
    train_config: DictConfig
    step: int
    tokenizer_name: str
    run_dir: Path
    checkpoint_path: Path

    def datamodule(self, **overrides: Any) -> Any:
        """The run's :class:`~picomaml.data.PicoDataModule`, rebuilt from ``training_config.yaml``.

        ``overrides`` replace constructor arguments (e.g. ``cache_dir`` when the run moved machines).
        """
        from hydra.utils import instantiate

        section = OmegaConf.to_container(self.train_config.data, resolve=True)
        section.update(overrides)
        return instantiate(section, _convert_="all")


def checkpoint_steps_available(run_dir: Path) -> list[int]:
    """Steps N with a ``checkpoints/step_<N>/checkpoint.ckpt``, sorted."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    steps = (_STEP_DIR.match(p.name) for p in ckpt_dir.iterdir() if (p / CHECKPOINT_FILE).is_file())
    return sorted(int(m.group(1)) for m in steps if m)


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """``(run_dir, checkpoint file)`` for a run dir, a ``.ckpt`` file or a ``checkpoints/step_<N>`` dir.

    ``step`` picks step N of a run dir (default: ``last.ckpt``, else the newest step). Raises
    :class:`RunError` (or FileNotFoundError for a missing path) with what is wrong and what exists.
    """
    path = Path(path).expanduser()
    # checkpoints/step_<N> names a step whether or not that step was saved
    in_checkpoints = path.parent.name == "checkpoints"
    names_step = _STEP_DIR.match(path.name) is not None and in_checkpoints
    if not path.exists() and not (names_step and path.parent.is_dir()):
        raise FileNotFoundError(f"{path}: no such file or directory")
    checkpoint = None
    if path.is_file():
        if path.suffix != ".ckpt":
            raise RunError(f"{path} is not a picomaml run: expected a run directory or a .ckpt file")
        checkpoint = path
        # <run>/checkpoints/last.ckpt or <run>/checkpoints/step_<N>/checkpoint.ckpt
        parent = path.parent.parent if path.parent.parent.name == "checkpoints" else path.parent
        run_dir = parent.parent if parent.name == "checkpoints" else parent
    elif names_step or (path.name == LATEST_LINK and in_checkpoints):
        run_dir, checkpoint = path.parent.parent, path / CHECKPOINT_FILE
        if step is not None:
            raise RunError(f"{path} is one step's directory; give the run dir to pick step={step}")
    else:
        run_dir = path.parent if path.name == "checkpoints" else path
    if not (run_dir / TRAINING_CONFIG).is_file():
        raise RunError(f"{run_dir} is not a picomaml run (no {TRAINING_CONFIG})")
    available = checkpoint_steps_available(run_dir)
    listed = ", ".join(map(str, available)) or "none"
    if checkpoint is None:
        ckpt_dir = run_dir / "checkpoints"
        if step is None:
            checkpoint = ckpt_dir / LAST_FILE
            if not checkpoint.is_file():
                if not available:
                    raise RunError(f"{run_dir} is not a picomaml run (no checkpoint in {ckpt_dir})")
                checkpoint = ckpt_dir / f"step_{available[-1]}" / CHECKPOINT_FILE
        else:
            checkpoint = ckpt_dir / f"step_{step}" / CHECKPOINT_FILE
    if not checkpoint.is_file():
        at_step = _STEP_DIR.match(checkpoint.parent.name)
        where = f"step {at_step.group(1)}" if at_step else str(checkpoint)
        raise RunError(f"no checkpoint at {where} in {run_dir} (available: {listed})")
    return run_dir, checkpoint


def load_run(path: str | Path, step: int | None = None) -> LoadedRun:
    """Load a run's checkpoint (see :func:`resolve_checkpoint` for the accepted paths).

    The backbone comes back in eval mode on the CPU; move it with ``run.model.to(device)``.
    """
    run_dir, checkpoint_path = resolve_checkpoint(path, step)
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise RunError(
            f"{checkpoint_path} cannot be read ({err}); it is corrupt or not a checkpoint"
        ) from err
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model_config" not in hparams or "state_dict" not in checkpoint:
        raise RunError(f"{checkpoint_path} is not a picomaml checkpoint (no model_config / state_dict)")
    model_config = ModelConfig(**dict(hparams["model_config"]))
    state = checkpoint["state_dict"]
    model = PicoDecoder(model_config)
    model.load_state_dict(_with_prefix(state, "model."))
    model.eval()

    meta_config, meta_head = None, None
    head_state = _with_prefix(state, "meta_head.")
    if head_state:
        meta_config = MetaConfig(**dict(hparams.get("meta_config") or {}))
        meta_head = MetaHead(model_config.d_model, meta_config)
        meta_head.load_state_dict(head_state)
        meta_head.eval()
    train_config = OmegaConf.load(run_dir / TRAINING_CONFIG)
    return LoadedRun(
        model=model,
        meta_head=meta_head,
        model_config=model_config,
        meta_config=meta_config,
        train_config=train_config,
        step=int(checkpoint.get("global_step", 0)),
        tokenizer_name=str(OmegaConf.select(train_config, "data.tokenizer", default="gpt2")),
        run_dir=run_dir,
        checkpoint_path=checkpoint_path,
    )


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


Args = TypeVar("Args")


def parse_cli_args(cls: type[Args], argv: list[str], prog: str) -> Args:
    """Parse Hydra-style ``key=value`` arguments into the dataclass ``cls``.

    Values convert to the field's type (``int``, ``float``, ``bool`` as true/false, ``str`` taken
    verbatim so a prompt may hold spaces or ``=``, and ``null`` for optional fields). An unknown key,
    a missing required key or a bad value exits with one line naming it and the valid keys.
    ``-h``/``--help`` prints the class docstring.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    usage = f"usage: python -m {prog} " + " ".join(
        f"{name}=..." if _required(f) else f"[{name}=...]" for name, f in fields.items()
    )
    if any(a in ("-h", "--help") for a in argv):
        print(f"{usage}\n\n{cls.__doc__}")
        raise SystemExit(0)
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise SystemExit(f"{prog}: expected key=value, got {arg!r}\n{usage}")
        if key not in fields:
            raise SystemExit(f"{prog}: unknown key {key!r}; valid keys: {', '.join(fields)}")
        try:
            values[key] = _convert(raw, hints[key])
        except ValueError as err:
            raise SystemExit(f"{prog}: {key}={raw!r}: {err}") from err
    missing = [name for name, f in fields.items() if _required(f) and name not in values]
    if missing:
        raise SystemExit(f"{prog}: missing required key(s) {', '.join(missing)}\n{usage}")
    return cls(**values)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _convert(raw: str, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options:
        if raw.lower() in ("null", "none", "~"):
            return None
        options = tuple(o for o in options if o is not type(None))
    target = options[0]
    if target is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if target is int:
        return int(raw)
    if target is float:
        return float(raw)
    return raw


def main_guard(fn: typing.Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a CLI body, turning :class:`RunError` / FileNotFoundError into one line and exit code 1."""
    try:
        return fn(sys.argv[1:] if argv is None else argv)
    except (RunError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err
