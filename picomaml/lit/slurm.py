"""Preemption-safe training under submitit (``hydra/launcher=slurm`` or ``submitit_local``).

Who handles which signal in a submitit job, and why Lightning's defaults are wrong there:

* submitit handles ``SIGUSR2`` (``sbatch --signal=USR2@<signal_delay_s>``: sent that long before the
  time limit, and on clusters that signal preemption with it): it calls the Hydra launcher's
  ``checkpoint()``, which re-pickles the same job, runs ``scontrol requeue`` and exits with
  ``sys.exit(-1)`` from inside the handler, i.e. wherever the training loop happens to be. ``SIGTERM``
  (and ``SIGCONT``) it only logs.
* Lightning 2.6 registers its own ``SIGTERM`` handler when ``fit`` starts (``_SignalConnector``), for
  every cluster environment: it sets ``trainer.received_sigterm``, and the training loop then raises
  ``SIGTERMException`` (a ``SystemExit``) at the end of the current batch. SLURM sends ``SIGTERM`` (then
  ``SIGKILL`` after ``KillWait``) on preemption, ``scancel`` and ``scontrol requeue``, so the job ends
  without a result where it should have trained on until ``SIGUSR2`` or the kill. On top, Lightning's
  ``SLURMEnvironment`` defaults to ``auto_requeue=True``: ``SIGUSR1`` writes an ``hpc_ckpt_*.ckpt`` and
  runs ``scontrol requeue`` itself, a second requeue mechanism next to submitit's.

`submitit_plugins` turns Lightning's requeue off and `PreemptionCheckpoint` takes both signals back
from Lightning: either signal makes it write ``last.ckpt`` at the next step boundary that ends a logging
window; training goes on after ``SIGTERM``, and after ``SIGUSR2`` submitit's own handler then requeues.
A requeued job (by submitit or by SLURM) runs the same pickled call into the same output dir, where
``picomaml.train`` resumes from ``last.ckpt``. A save at a step that also validates waits for the
validation, as the step checkpoints do (:mod:`picomaml.lit.checkpointing`): Lightning counts a validation
after a checkpoint's batch as done, so the resumed job would never log it.

Data parallel in one job (``hydra.launcher.tasks_per_node``, ``hydra.launcher.nodes``): submitit runs the
same pickled call in every SLURM task, and each task is one rank: Lightning's ``SLURMEnvironment`` reads
``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS`` and the node list, and no process is started by
Lightning. The trainer must therefore ask for exactly the job's shape, ``trainer.devices`` = tasks per
node and ``trainer.num_nodes`` = nodes, with a strategy that does not start processes of its own
(``ddp``, not ``ddp_spawn``); :func:`check_slurm_tasks` refuses anything else before training starts.
Only rank 0 calls submitit's requeue (submitit's handler does nothing on other ranks); every rank saves
``last.ckpt`` at the same step and then stops, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from picomaml.config import ConfigError
from picomaml.lit.checkpointing import validation_follows

log = logging.getLogger(__name__)

_Handler = Any  # what signal.getsignal returns: a callable, SIG_DFL/SIG_IGN or None


def under_submitit() -> bool:
    """Whether this process runs a submitit job (SLURM or local): submitit's own activation test."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def submitit_plugins() -> list[Any]:
    """Trainer plugins for a submitit job: on SLURM, the SLURM environment without Lightning's requeue."""
    if under_submitit() and SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def slurm_job_shape() -> tuple[int, int]:
    """(tasks per node, nodes) of the SLURM job this process runs in, from the variables sbatch sets."""
    nodes = int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    tasks = int(per_node) if per_node else int(os.environ.get("SLURM_NTASKS", "1")) // nodes
    return tasks, nodes


def check_slurm_tasks(trainer: pl.Trainer) -> None:
    """In a submitit job on SLURM, the trainer's shape must be the job's: one rank per SLURM task.

    The launcher's ``tasks_per_node`` and ``nodes`` decide how many processes exist; Lightning only
    joins them. A trainer that expects another number would fail (or hang) at the first collective, so
    a mismatch is a :class:`ConfigError` naming both keys before anything is written or trained. The
    trainer is not silently reshaped to the job: the recorded config (``.hydra/``,
    ``training_config.yaml``) must say what ran, and only the user knows which of the two numbers is
    the intended one. Outside submitit, Lightning's own SLURM checks stand.
    """
    if not (under_submitit() and SLURMEnvironment.detect()):
        return
    tasks, nodes = slurm_job_shape()
    if trainer.num_devices != tasks:
        raise ConfigError(
            f"trainer.devices={trainer.num_devices} but this SLURM job runs {tasks} task(s) per node "
            f"(hydra.launcher.tasks_per_node={tasks}), and each task is one rank: set "
            f"trainer.devices={tasks}, or hydra.launcher.tasks_per_node={trainer.num_devices}"
        )
    if trainer.num_nodes != nodes:
        raise ConfigError(
            f"trainer.num_nodes={trainer.num_nodes} but this SLURM job has {nodes} node(s) "
            f"(hydra.launcher.nodes={nodes}): set trainer.num_nodes={nodes}, or "
            f"hydra.launcher.nodes={trainer.num_nodes}"
        )
    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        raise ConfigError(
            f"trainer.strategy={type(trainer.strategy).__name__} (spawn) starts its own processes, but in "
            "a SLURM job each task is already one rank: use trainer=ddp (strategy "
            "ddp_find_unused_parameters_true; add trainer.accelerator=cpu trainer.precision=32-true on CPUs)"
        )


def _requeue_signal() -> signal.Signals:
    import submitit

    # submitit's preemption signal: USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


class PreemptionCheckpoint(pl.Callback):
    """Writes ``last_ckpt`` soon after ``SIGTERM`` or submitit's requeue signal, instead of stopping.

    The save waits for the first optimizer step that ends a logging window (at most
    ``log_every_n_steps`` steps): the module's windowed training means are not part of a checkpoint, so
    a save in mid-window would make the resumed run log a shorter window than the uninterrupted one.
    With several ranks, all save at the same step (the first one where any rank got a signal).
    A signal after the last training step changes nothing: the job finishes instead of requeueing.
    The requeue is decided together too: if any rank got submitit's signal, every rank stops after the
    save; rank 0 runs submitit's requeue and the others exit, instead of waiting in the next collective
    for a rank 0 that is gone.
    """

    def __init__(self, last_ckpt: Path) -> None:
        self.last_ckpt = Path(last_ckpt)
        self._requeue_sig = _requeue_signal()
        self._previous: dict[signal.Signals, _Handler] = {}
        self._save_pending = False
        self._requeue_pending: signal.Signals | None = None
        self._after_validation: int | None = None  # a step whose save waits for its validation
        self._installed = False
        self._last_seen_step = 0

    # Lightning registers its SIGTERM handler after `setup` and before sanity checking / training, so
    # the handlers to chain to (submitit's) are read in `setup` and ours go in once the loop starts.
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, self._requeue_sig)}
        self._installed = False

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def _install(self, trainer: pl.Trainer) -> None:
        self._last_seen_step = trainer.global_step
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        # Lightning's `teardown` puts back the handlers it found when fit started (submitit's)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(self._requeue_sig, self._on_requeue_signal)
        self._installed = True

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM: saving %s at the next logging step and training on", self.last_ckpt)
        self._save_pending = True
        previous = self._previous.get(signal.SIGTERM)
        if callable(previous):  # submitit's: logs that it bypasses the signal
            previous(signum, frame)

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        # submitit's handler exits from wherever it runs; defer it to a step boundary after the save
        name = signal.Signals(signum).name
        log.warning("%s: saving %s at the next logging step, then requeueing", name, self.last_ckpt)
        self._save_pending = True
        self._requeue_pending = signal.Signals(signum)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        stepped, self._last_seen_step = step != self._last_seen_step, step
        # only after a micro-batch that completed an optimizer step which closed a logging window
        if not stepped or step % max(1, trainer.log_every_n_steps) != 0:
            return
        if not trainer.strategy.reduce_boolean_decision(self._save_pending, all=False):
            return
        requeue = self._requeue_pending is not None
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(requeue, all=False) != requeue:
            self._requeue_pending = self._requeue_sig  # another rank got the signal: requeue with it
        if validation_follows(trainer):
            self._after_validation = step
            return
        self._save(trainer, step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._after_validation == trainer.global_step:
            self._save(trainer, trainer.global_step)

    def _save(self, trainer: pl.Trainer, step: int) -> None:
        trainer.save_checkpoint(self.last_ckpt, weights_only=False)
        log.warning("saved %s at step %d after a signal", self.last_ckpt, step)
        self._save_pending = False
        self._after_validation = None
        if self._requeue_pending is not None:
            signum, self._requeue_pending = self._requeue_pending, None
            previous = self._previous.get(signum)
            if callable(previous):  # submitit: re-pickles the job, `scontrol requeue`, sys.exit(-1)
                previous(signum, None)  # (on ranks other than 0 it only logs and returns)
            if trainer.global_rank != 0:
                log.warning("rank %d stops after the save; rank 0 requeues the job", trainer.global_rank)
                raise SystemExit(-1)  # as submitit's own exit on rank 0


def preemption_callbacks(output_dir: Path) -> list[pl.Callback]:
    """``[PreemptionCheckpoint]`` in a submitit job, else nothing (Lightning's defaults stand)."""
    if not under_submitit():
        return []
    return [PreemptionCheckpoint(output_dir / "checkpoints" / "last.ckpt")]
