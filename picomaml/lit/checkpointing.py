"""Checkpoints in pico-train's layout: one directory per scheduled step, loadable by Hugging Face as is.

The layout's names live in :mod:`picomaml.runs`, which reads what this callback writes.

At each scheduled step N (after N optimizer updates) :class:`StepCheckpoints` writes::

    <checkpoints>/step_<N>/
        config.json  model.safetensors     the backbone as a plain ``LlamaForCausalLM`` (picomaml.model.hf),
        tokenizer.json  ...                so ``from_pretrained("checkpoints/step_<N>")`` works
        checkpoint.ckpt                    the Lightning checkpoint: weights, optimizer, scheduler, RNG,
                                           data position, meta head, logging window (what resume needs)
        learning_dynamics/                 written by picomaml.lit.dynamics at the same steps
    <checkpoints>/latest -> step_<N>       the newest complete step directory (a relative symlink)
    <checkpoints>/last.ckpt                the newest resumable state: a hard link to the newest
                                           step's checkpoint.ckpt, or a signal save (picomaml.lit.slurm)

Schedule (:func:`checkpoint_steps`): Pythia's log-spaced 0, 1, 2, 4, ..., 512, then every
``every_n_train_steps``, and the final step. Every file is written to a temporary name and renamed
(POSIX-atomic), the Lightning checkpoint first and ``latest`` last, so a save killed half-way leaves
the previous checkpoints as they were and never a file that loads wrong; ``latest`` only ever names a
directory whose files are all complete. The Hugging Face files come from the state dict the Lightning
checkpoint was made from (gathered in full on rank 0 under FSDP with ``state_dict_type: full``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from picomaml.model.hf import export_state_to_hf
from picomaml.runs import CHECKPOINT_FILE, LAST_FILE, LATEST_LINK, step_dir_name

log = logging.getLogger(__name__)


def checkpoint_steps(max_steps: int, every_n_steps: int, log_spaced_until: int = 512) -> list[int]:
    """Steps 0, 1, 2, 4, ... (powers of two up to ``log_spaced_until``), every multiple of
    ``every_n_steps``, and ``max_steps`` itself; all <= ``max_steps``, sorted.

    >>> checkpoint_steps(2500, 1000)
    [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 2500]
    """
    if max_steps < 0 or every_n_steps < 1 or log_spaced_until < 0:
        raise ValueError(
            f"need max_steps >= 0, every_n_steps >= 1, log_spaced_until >= 0; "
            f"got {max_steps}, {every_n_steps}, {log_spaced_until}"
        )
    steps = {0, max_steps}
    power = 1
    while power <= min(log_spaced_until, max_steps):
        steps.add(power)
        power *= 2
    steps.update(range(every_n_steps, max_steps + 1, every_n_steps))
    return sorted(steps)


class StepCheckpoints(pl.Callback):
    """Saves ``step_<N>/`` checkpoints on the schedule, ``latest`` and ``last.ckpt`` (module docstring).

    Args:
        dirpath: the run's checkpoint directory (default ``<trainer.default_root_dir>/checkpoints``).
        every_n_train_steps: after the log-spaced steps, save every this many optimizer steps.
        log_spaced_until: last power-of-two step of the early schedule (Pythia: 512; 0: none but step 0).
        steps: an explicit list of steps instead of the schedule.
        hf_export: also write the ``LlamaForCausalLM`` files into each step directory.
        save_tokenizer: add the data module's tokenizer files to the export.
        uploader: something with ``submit(folder, step)`` (``picomaml.lit.hub.HubUploader``), given each
            complete step directory to push from a background thread.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        every_n_train_steps: int = 1000,
        log_spaced_until: int = 512,
        steps: Sequence[int] | None = None,
        hf_export: bool = True,
        save_tokenizer: bool = True,
        uploader: Any = None,
    ) -> None:
        super().__init__()
        if every_n_train_steps < 1:
            raise ValueError(
                f"callbacks.model_checkpoint.every_n_train_steps must be >= 1, got {every_n_train_steps}"
            )
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_train_steps = every_n_train_steps
        self.log_spaced_until = log_spaced_until
        self.steps = sorted(set(steps)) if steps is not None else None
        self.hf_export = hf_export
        self.save_tokenizer = save_tokenizer
        self.uploader = uploader
        self._schedule: set[int] = set()
        self._last_saved = -1
        self._capture = False
        self._captured_state: dict[str, torch.Tensor] | None = None
        self._tokenizer_failed = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        steps = self.steps
        if steps is None:
            steps = checkpoint_steps(
                max(trainer.max_steps, 0), self.every_n_train_steps, self.log_spaced_until
            )
        self._schedule = set(steps)
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run already saved its checkpoint step; a fresh one saves its initial weights
        self._last_saved = trainer.global_step if trainer.global_step > 0 else -1
        if trainer.global_step == 0 and 0 in self._schedule:
            self.save(trainer, 0)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > self._last_saved and step in self._schedule:
            self.save(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run stopped early (should_stop, a pruned trial) still leaves its final state resumable
        if trainer.global_step > self._last_saved:
            self.save(trainer, trainer.global_step)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._capture:
            self._captured_state = checkpoint.get("state_dict")

    def save(self, trainer: pl.Trainer, step: int) -> Path:
        """Writes ``step_<step>/`` (every rank must call it: the Lightning save is collective)."""
        self._last_saved = step
        assert self.dirpath is not None
        step_dir = self.dirpath / step_dir_name(step)
        if trainer.is_global_zero and step_dir.is_dir():
            # temporary files of a save that was killed (a resumed run saves this step again)
            for stale in step_dir.glob(".*tmp-*"):
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self._capture = True
        try:
            trainer.save_checkpoint(step_dir / CHECKPOINT_FILE, weights_only=False)
        finally:
            self._capture = False
        state, self._captured_state = self._captured_state, None
        if trainer.is_global_zero:
            if self.hf_export and state:
                self._export(trainer, state, step_dir)
            _link_atomic(step_dir / CHECKPOINT_FILE, self.dirpath / LAST_FILE)
            _symlink_atomic(step_dir_name(step), self.dirpath / LATEST_LINK)
            if self.uploader is not None:
                self.uploader.submit(step_dir, step)
        trainer.strategy.barrier("StepCheckpoints.save")
        return step_dir

    def _export(self, trainer: pl.Trainer, state: dict[str, torch.Tensor], step_dir: Path) -> None:
        model_config = trainer.lightning_module.model_config
        backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        tmp = step_dir / f".hf-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            export_state_to_hf(backbone, model_config, tmp, self._tokenizer(trainer))
            # the weights last: a directory with config.json but no model.safetensors fails to load
            # loudly, while weights beside a stale config could load wrong
            names = sorted(p.name for p in tmp.iterdir())
            names.sort(key=lambda name: name == "model.safetensors")
            for name in names:
                os.replace(tmp / name, step_dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _tokenizer(self, trainer: pl.Trainer) -> Any:
        if not self.save_tokenizer or self._tokenizer_failed:
            return None
        try:
            return trainer.datamodule.tokenizer
        except Exception as err:  # e.g. the OLMo tokenizer of data=dolma without the Hub
            log.warning("checkpoints are exported without a tokenizer: %s", err)
            self._tokenizer_failed = True
            return None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.uploader is not None and stage == "fit":
            self.uploader.close(timeout=60)


def _link_atomic(target: Path, link: Path) -> None:
    """``link`` becomes a hard link to ``target`` (a copy where the file system has no hard links)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, link)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _symlink_atomic(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
