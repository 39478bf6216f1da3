"""The run directory: its layout, finding a checkpoint in it, and loading one back (one module for all).

A run directory (what ``python -m picomaml.train`` writes)::

    <run>/training_config.yaml              the full resolved Hydra config (data, model, meta, ...)
    <run>/result.json                       status, the optimized metric, tokens seen, wall time
    <run>/csv/metrics.csv                   Lightning CSV metrics
    <run>/checkpoints/last.ckpt             what a rerun resumes from: the newest step's checkpoint
    <run>/checkpoints/latest -> step_<N>    the newest complete step directory
    <run>/checkpoints/step_<N>/checkpoint.ckpt          the Lightning checkpoint of step N
    <run>/checkpoints/step_<N>/{config.json,model.safetensors,...}   its LlamaForCausalLM export
    <run>/checkpoints/step_<N>/learning_dynamics/...   pico-train's learning-dynamics dumps

``picomaml.lit.checkpointing`` writes this layout; ``train`` (resume), ``evaluate``, ``generate``,
``analyze`` and ``export`` read it through :func:`resolve_checkpoint`, :func:`read_checkpoint` (with the
architecture check) and :func:`load_run`. A path may name ``<run>``, a ``.ckpt`` file, or a
``checkpoints/step_<N>`` (or ``checkpoints/latest``) directory. The backbone (and the meta head of a meta
run) comes back from the checkpoint's ``state_dict`` (backbone under ``model.``, head under
``meta_head.``) and ``hyper_parameters`` (``model_config``, ``meta_config``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from picomaml.config import ConfigError
from picomaml.meta import MetaConfig, MetaHead
from picomaml.model import ModelConfig, PicoDecoder, load_model_config

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_FILE = "checkpoint.ckpt"
LAST_FILE = "last.ckpt"
LATEST_LINK = "latest"
log = logging.getLogger(__name__)

TRAINING_CONFIG = "training_config.yaml"
RESULT_FILE = "result.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """``step_<N>``: the directory of step N's checkpoint under ``checkpoints/``."""
    return f"step_{step}"


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
        check_targets(section, "data")
        return instantiate(section, _convert_="all")


def checkpoint_steps_available(run_dir: Path) -> list[int]:
    """Steps N with a ``checkpoints/step_<N>/checkpoint.ckpt``, sorted."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
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
    in_checkpoints = path.parent.name == CHECKPOINTS_DIR
    names_step = _STEP_DIR.match(path.name) is not None and in_checkpoints
    if not path.exists() and not (names_step and path.parent.is_dir()):
        raise FileNotFoundError(f"{path}: no such file or directory")
    checkpoint = None
    if path.is_file():
        if path.suffix != ".ckpt":
            raise RunError(f"{path} is not a picomaml run: expected a run directory or a .ckpt file")
        checkpoint = path
        # <run>/checkpoints/last.ckpt or <run>/checkpoints/step_<N>/checkpoint.ckpt
        parent = path.parent.parent if path.parent.parent.name == CHECKPOINTS_DIR else path.parent
        run_dir = parent.parent if parent.name == CHECKPOINTS_DIR else parent
    elif names_step or (path.name == LATEST_LINK and in_checkpoints):
        run_dir, checkpoint = path.parent.parent, path / CHECKPOINT_FILE
        if step is not None:
            raise RunError(f"{path} is one step's directory; give the run dir to pick step={step}")
    else:
        run_dir = path.parent if path.name == CHECKPOINTS_DIR else path
    if not (run_dir / TRAINING_CONFIG).is_file():
        raise RunError(f"{run_dir} is not a picomaml run (no {TRAINING_CONFIG})")
    available = checkpoint_steps_available(run_dir)
    listed = ", ".join(map(str, available)) or "none"
    if checkpoint is None:
        ckpt_dir = run_dir / CHECKPOINTS_DIR
        if step is None:
            checkpoint = ckpt_dir / LAST_FILE
            if not checkpoint.is_file():
                if not available:
                    raise RunError(f"{run_dir} is not a picomaml run (no checkpoint in {ckpt_dir})")
                checkpoint = ckpt_dir / step_dir_name(available[-1]) / CHECKPOINT_FILE
        else:
            checkpoint = ckpt_dir / step_dir_name(step) / CHECKPOINT_FILE
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
    checkpoint = read_checkpoint(checkpoint_path)
    hparams = checkpoint["hyper_parameters"]
    model_config = saved_model_config(checkpoint)
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


# What a config rebuilt from a run dir may instantiate: picomaml's own classes and nothing else. A run
# dir may come from anywhere, and Hydra would otherwise call any importable `_target_` (torch.load,
# os.system, ...) with arguments from the file.
SAFE_TARGETS = frozenset(
    {
        "picomaml.data.PicoDataModule",
        "picomaml.data.datamodule.PicoDataModule",
        "picomaml.model.ModelConfig",
        "picomaml.model.pico_decoder.ModelConfig",
        "picomaml.meta.MetaConfig",
        "picomaml.meta.config.MetaConfig",
    }
)


def check_targets(node: Any, where: str) -> None:
    """Raise :class:`RunError` when ``node`` (a config as plain containers) names a ``_target_`` outside
    :data:`SAFE_TARGETS`, at any depth."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and target not in SAFE_TARGETS:
            raise RunError(
                f"{where}._target_={target!r} is not one of picomaml's classes "
                f"({', '.join(sorted(SAFE_TARGETS))}); refusing to instantiate it from a run directory"
            )
        for key, value in node.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{where}[{i}]")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A picomaml Lightning checkpoint's dict (memory-mapped), or :class:`RunError` saying why not.

    Only tensors and plain containers are unpickled (``weights_only=True``): a checkpoint from an
    untrusted run dir cannot execute code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise RunError(
            f"{path} cannot be read ({_first_line(err)}); it is corrupt or not a checkpoint"
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "model_config" not in hparams or "state_dict" not in checkpoint:
        raise RunError(f"{path} is not a picomaml checkpoint (no model_config / state_dict inside)")
    return checkpoint


def saved_model_config(checkpoint: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint was trained with."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = dict(checkpoint["hyper_parameters"]["model_config"])
    return ModelConfig(**{k: v for k, v in saved.items() if k in fields})


def check_architecture(path: Path, model_config: ModelConfig) -> int:
    """Refuse a checkpoint of another architecture with the differing keys, not a state_dict dump.

    Returns the checkpoint's global step (read here so the file is opened once). Raises
    :class:`~picomaml.config.ConfigError` (the config asked for something the checkpoint is not).
    """
    try:
        checkpoint = read_checkpoint(path)
    except RunError as err:
        raise ConfigError(str(err)) from err
    # a key the checkpoint predates (e.g. model.attention) had its default value then
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    saved = {**defaults, **checkpoint["hyper_parameters"]["model_config"]}
    wanted = dataclasses.asdict(model_config)
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diff:
        lines = ", ".join(f"model.{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise ConfigError(f"checkpoint {path} is from a different architecture ({lines})")
    return int(checkpoint["global_step"])


def resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> Path | None:
    """The checkpoint a training run starts from: ``ckpt_path`` if given (a ``.ckpt``, a step dir or a
    run dir), else the run dir's own ``last.ckpt``, else None (a fresh run).

    A ``last.ckpt`` that is missing or does not load (truncated, garbage) falls back to the newest step
    checkpoint that loads, with a warning naming both. A run dir that already holds a run but no
    loadable checkpoint is refused rather than silently overwritten.
    Raises :class:`~picomaml.config.ConfigError` naming ``ckpt_path``.
    """
    if ckpt_path:
        path = Path(ckpt_path)
        if path.is_dir():
            # a step directory (checkpoints/step_<N>, checkpoints/latest) or a run dir
            in_step = (path / CHECKPOINT_FILE).is_file()
            path = path / CHECKPOINT_FILE if in_step else path / CHECKPOINTS_DIR / LAST_FILE
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path}: no checkpoint file at {path} (give a .ckpt file, a run dir "
                "with checkpoints/last.ckpt, or a checkpoints/step_<N> directory)"
            )
        return path
    last = output_dir / CHECKPOINTS_DIR / LAST_FILE
    if last.is_file() and _loadable(last):
        return last
    fallback = _newest_loadable_step(output_dir)
    if fallback is not None:
        why = "cannot be read" if last.is_file() else "is missing"
        log.warning(
            "%s %s; resuming from %s, the newest step checkpoint that loads", last, why, fallback.parent.name
        )
        return fallback
    if last.is_file():
        raise ConfigError(
            f"{last} cannot be read and no checkpoints/step_<N>/{CHECKPOINT_FILE} in {output_dir} loads; "
            "resume from a copy with ckpt_path=<file or step dir>, or pick another run_name"
        )
    leftovers = [p for p in (CHECKPOINTS_DIR, "csv", "tensorboard") if (output_dir / p).exists()]
    if (output_dir / RESULT_FILE).exists() and not _failed_before_training(output_dir / RESULT_FILE):
        leftovers.append(RESULT_FILE)
    if leftovers:
        raise ConfigError(
            f"output dir {output_dir} already holds a run ({', '.join(leftovers)}) but no "
            "checkpoint to resume from; resume from one with ckpt_path=<file or step dir>, pick another "
            "run_name, or move that directory away"
        )
    return None


def _loadable(path: Path) -> bool:
    try:
        read_checkpoint(path)
    except RunError:
        return False
    return True


def _newest_loadable_step(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/step_<N>/checkpoint.ckpt`` that reads as a picomaml checkpoint."""
    for step in reversed(checkpoint_steps_available(run_dir)):
        path = run_dir / CHECKPOINTS_DIR / step_dir_name(step) / CHECKPOINT_FILE
        if _loadable(path):
            return path
    return None


def metrics_row_step(row: dict[str, str | None]) -> int | None:
    """A ``csv/metrics.csv`` row's step (a row from ``csv.DictReader``), or None for a row that cannot
    be a logged row: an empty or garbled step, or more or fewer cells than the header. Readers drop such
    rows instead of failing, so a damaged file never makes a run unresumable or unreadable."""
    if None in row or any(value is None for value in row.values()):
        return None  # csv.DictReader's marks for too many / too few cells
    try:
        return int(float(row["step"] or ""))
    except ValueError:
        return None


LOCK_FILE = ".lock"


class RunLock:
    """One process per run dir: an exclusive ``flock`` on ``<run>/.lock``, held for the whole run.

    The kernel drops the lock when its holder dies, however it dies (kill -9, OOM, a SLURM preemption),
    so a killed run never blocks its rerun or its requeue; a live holder is named (pid, host, since) in
    the refusal. Only the process that owns the run takes it (global rank 0; the other ranks of a
    data-parallel job run inside the same lock).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)  # the run dir is created here, under the lock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"run dir {self.path.parent} is in use by {holder}; wait for it to finish, or give this "
                "command another run_name"
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {started})\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmless and reusable
            self._fd = None


def _failed_before_training(result_file: Path) -> bool:
    """A result.json of a job that stopped before training (a config error): nothing to protect."""
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        return False
    return result.get("status") == "failed" and "global_step" not in result


def load_model(path: str | Path, preset: str | None = None) -> PicoDecoder:
    """A :class:`PicoDecoder` from a run, a step dir or a ``.ckpt`` (see :func:`resolve_checkpoint`), or
    from a plain ``state_dict`` file of pico's module names (then ``preset`` names its size)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path if path.is_file() else resolve_checkpoint(path)[1])
        config, state = saved_model_config(checkpoint), _with_prefix(checkpoint["state_dict"], "model.")
    else:
        if preset is None:
            raise RunError(f"{path}: a plain state_dict holds no model config; give preset=<size>")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RunError(f"{path} cannot be read as a state_dict ({_first_line(err)})") from err
        config = load_model_config(preset)
    model = PicoDecoder(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _first_line(err: BaseException) -> str:
    """torch.load's errors run over many lines; one line of them is the reason."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
