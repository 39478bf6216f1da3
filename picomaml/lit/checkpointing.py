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
``every_n_train_steps``, and the final step. The Hugging Face files come from the state dict the
Lightning checkpoint was made from (gathered in full on rank 0 under FSDP with ``state_dict_type: full``).

When step N is saved. Everything the run does at step N happens before its checkpoint, so that the
checkpoint is "step N, done" and a run resumed from it logs exactly what the uninterrupted run logs:

* the callback runs after every other callback (it moves itself to the end of ``trainer.callbacks``,
  as Lightning does with its own checkpoint callbacks), so the step's periodic evaluation (``eval/*``
  rows) and learning-dynamics dump come first;
* when step N also validates, the save waits for ``on_validation_end`` (where Lightning's own
  ``ModelCheckpoint`` saves): a checkpoint taken at ``on_train_batch_end`` makes the resumed run skip
  that validation, which Lightning counts as done, and its ``val/*`` and ``meta_test/*`` rows are lost.
  Whether a validation follows is Lightning's own decision (:func:`validation_follows`); a validation
  that comes unforeseen after a save is followed by a second save of the same step.

The checkpoint's save writes the loggers' buffered rows (``PicoLitModule.on_save_checkpoint``), so the
rows of steps <= N are on disk whenever step N's checkpoint is.

Publishing. A step directory is published (``last.ckpt`` linked to it, then ``latest``) only when it is
complete: its ``checkpoint.ckpt``, its Hugging Face export, and the files of every other callback that
writes into step directories, i.e. every callback with a ``step_files_done(step) -> bool`` method
(:class:`~picomaml.lit.dynamics.LearningDynamics`). Step 0's checkpoint (the initial weights, saved
when training starts) is published once its dynamics, taken on the first batch, are written. Every
file is written to a temporary name and renamed (POSIX-atomic), so a save killed half-way leaves the
published checkpoints as they were and never a file that loads wrong.

Resuming. A run resumed at a scheduled step R completes ``step_R/`` if a kill (or a signal save that
ended the job, :mod:`picomaml.lit.slurm`) left it unfinished: the checkpoint it resumed from is linked
in, the Hugging Face export written from it, the dynamics redone (``LearningDynamics`` keeps the batch
they need in the checkpoint), and the directory published. A kill at any other point leaves
``last.ckpt`` at the previous complete step, from which the rerun redoes the unfinished one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from picomaml.lit.checkpoint_io import explain_disk_full
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


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after the training batch whose ``on_train_batch_end`` runs now.

    Asks Lightning's own test (``_TrainingEpochLoop._should_check_val_fx``: the interval, the last
    batch, an early stop), which the loop makes again with the same inputs once every
    ``on_train_batch_end`` has returned, and whether the validation loop has any batches. Those are
    private: should they change, this answers False and callers save at once, as they would without a
    validation (then :class:`StepCheckpoints` saves a second time after an unforeseen validation).
    """
    try:
        epoch_loop = trainer.fit_loop.epoch_loop
        if trainer.sanity_checking or epoch_loop._skip_next_val:
            return False
        return bool(
            epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher) and not epoch_loop.val_loop.skip
        )
    except AttributeError as err:  # another Lightning than the pinned one
        log.warning("cannot tell whether a validation follows this step (%s); saving before it", err)
        return False


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
        # a scheduled step whose save waits for the step's validation
        self._after_validation: int | None = None
        # a step saved at batch end (no validation foreseen): saved again if a validation comes anyway
        self._before_validation: int | None = None
        # a saved step whose directory waits for another callback's files before it is published
        self._unpublished: int | None = None
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
        model_config = getattr(pl_module, "model_config", None)
        if self.hf_export and getattr(model_config, "attention", "softmax") != "softmax":
            # no Llama counterpart (picomaml.model.hf.check_exportable): step dirs hold checkpoint.ckpt only
            log.info(
                "model.attention=%s: step checkpoints are saved without a HF export", model_config.attention
            )
            self.hf_export = False
        # Last at every hook from now on (module docstring). Lightning calls `setup` while iterating the
        # old list, which a new list leaves alone.
        trainer.callbacks = [*(c for c in trainer.callbacks if c is not self), self]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._after_validation = self._before_validation = self._unpublished = None
        # a fresh run saves its initial weights; a resumed one finishes its checkpoint step if needed
        self._last_saved = step if step > 0 else -1
        if step == 0 and 0 in self._schedule:
            self.save(trainer, 0)
        elif step > 0 and step in self._schedule:
            self._complete_resumed_step(trainer, step)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._publish_when_complete(trainer)  # step 0, once its dynamics are taken on this first batch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._before_validation = None
        if step > self._last_saved and step in self._schedule and step != self._after_validation:
            if validation_follows(trainer):
                self._after_validation = step
            else:
                self.save(trainer, step)
                self._before_validation = step
        self._publish_when_complete(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.sanity_checking and step in (self._after_validation, self._before_validation):
            self._after_validation = self._before_validation = None
            self.save(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run stopped early (should_stop, a pruned trial) still leaves its final state resumable
        self._after_validation = None
        if trainer.global_step > self._last_saved:
            self.save(trainer, trainer.global_step)
        self._publish_when_complete(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._capture:
            self._captured_state = checkpoint.get("state_dict")

    def save(self, trainer: pl.Trainer, step: int) -> Path:
        """Writes ``step_<step>/`` and publishes it once complete (every rank must call it: the
        Lightning save is collective)."""
        self._last_saved = step
        assert self.dirpath is not None
        step_dir = self.dirpath / step_dir_name(step)
        if trainer.is_global_zero and step_dir.is_dir():
            _remove_temporaries(step_dir)
        self._capture = True
        try:
            trainer.save_checkpoint(step_dir / CHECKPOINT_FILE, weights_only=False)
        finally:
            self._capture = False
        state, self._captured_state = self._captured_state, None
        if trainer.is_global_zero:
            if self.hf_export and state:
                self._export(trainer, state, step_dir)
            self._unpublished = step
            self._publish_when_complete(trainer)
        trainer.strategy.barrier("StepCheckpoints.save")
        return step_dir

    def _complete_resumed_step(self, trainer: pl.Trainer, step: int) -> None:
        """Finish ``step_<step>/`` of a run resumed at that step, if it is unfinished or unpublished.

        The state the run resumed from is step ``step``'s (its checkpoint: a step save, a signal save,
        another run's step dir), so it is what ``checkpoint.ckpt`` and the export hold. Nothing is
        saved through Lightning here: that would flush the loggers and count as a save of this run.
        """
        assert self.dirpath is not None
        step_dir = self.dirpath / step_dir_name(step)
        checkpoint = step_dir / CHECKPOINT_FILE
        if trainer.is_global_zero:
            unfinished = not checkpoint.is_file() or (self.hf_export and not _hf_export_complete(step_dir))
            if unfinished and not checkpoint.is_file() and trainer.ckpt_path is None:
                log.warning("cannot complete %s: no checkpoint file to take it from", step_dir)
                unfinished = False
            elif unfinished:
                log.info("completing %s, which the run resumed from", step_dir)
                step_dir.mkdir(parents=True, exist_ok=True)
                _remove_temporaries(step_dir)
                if not checkpoint.is_file():
                    _link_atomic(Path(trainer.ckpt_path), checkpoint)
                if self.hf_export and not _hf_export_complete(step_dir):
                    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
                    self._export(trainer, saved["state_dict"], step_dir)
            if checkpoint.is_file() and (unfinished or not self._published(step)):
                self._unpublished = step
                self._publish_when_complete(trainer)
        trainer.strategy.barrier("StepCheckpoints.complete")

    def _published(self, step: int) -> bool:
        """Whether ``latest`` names this step or a later one."""
        assert self.dirpath is not None
        try:
            target = os.readlink(self.dirpath / LATEST_LINK)
        except OSError:
            return False
        match = re.fullmatch(r"step_(\d+)", target)
        return match is not None and int(match.group(1)) >= step

    def _publish_when_complete(self, trainer: pl.Trainer) -> None:
        """Link ``last.ckpt`` and then ``latest`` to the saved step once every callback that writes into
        step directories is done with it (rank 0)."""
        step = self._unpublished
        if step is None or not trainer.is_global_zero:
            return
        for callback in trainer.callbacks:
            done = getattr(callback, "step_files_done", None)
            if callback is not self and callable(done) and not done(step):
                return
        assert self.dirpath is not None
        step_dir = self.dirpath / step_dir_name(step)
        _link_atomic(step_dir / CHECKPOINT_FILE, self.dirpath / LAST_FILE)
        _symlink_atomic(step_dir_name(step), self.dirpath / LATEST_LINK)
        self._unpublished = None
        if self.uploader is not None:
            self.uploader.submit(step_dir, step)

    def _export(self, trainer: pl.Trainer, state: dict[str, torch.Tensor], step_dir: Path) -> None:
        model_config = trainer.lightning_module.model_config
        backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        tmp = step_dir / f".hf-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with explain_disk_full(step_dir / "model.safetensors"):
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


def _hf_export_complete(step_dir: Path) -> bool:
    # the export renames model.safetensors into place last
    return (step_dir / "config.json").is_file() and (step_dir / "model.safetensors").is_file()


def _remove_temporaries(step_dir: Path) -> None:
    """Temporary files and directories of a save that was killed (the rerun saves the step again)."""
    for stale in step_dir.glob(".*tmp-*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def _link_atomic(target: Path, link: Path) -> None:
    """``link`` becomes a hard link to ``target`` (a copy where the file system has no hard links)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        with explain_disk_full(link):
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
    try:
        with explain_disk_full(link):
            os.symlink(target, tmp)
            os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)
