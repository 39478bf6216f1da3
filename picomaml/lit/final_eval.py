"""The full evaluation of a finished run, at the end of fit: its final checkpoint beside its step-0 one.

:class:`FinalEvaluation` (``callbacks.final_eval``; ``experiment=ar_vs_hybrid`` adds it, any run may)
scores two checkpoints of the run with one :class:`~picomaml.eval.suite.SuiteRunner`:

- ``final``: the checkpoint of the last step (``checkpoints/step_<N>/checkpoint.ckpt``, written by
  ``callbacks.model_checkpoint`` before this callback runs);
- ``step0``: the run's own step-0 checkpoint, its random initialisation. Every arm of a study that
  shares a seed and a model size starts from these same weights, so it is the control that says how
  much of a final score training earned, and its scores are identical across arms by construction.

Both are loaded from disk with :func:`picomaml.runs.load_run`, exactly as ``python -m picomaml.evaluate
ckpt_path=<run> control=step0`` loads them, so that command given the same options reproduces the
numbers, and sharded (FSDP) training needs no gather here. Results go to ``<run>/eval_results/final.json`` as
``{"final": {...}, "step0": {...}}`` (the keys of :meth:`~picomaml.eval.suite.SuiteRunner.score`),
written to a temporary file and renamed, so a reader never sees half a file. It runs on global rank 0
only, after training, so it cannot change the training trajectory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from picomaml.eval.downstream import DownstreamConfig
from picomaml.eval.numeric import NumericConfig
from picomaml.eval.suite import SuiteOptions, SuiteRunner
from picomaml.lit.checkpointing import StepCheckpoints, checkpoint_steps
from picomaml.runs import CHECKPOINTS_DIR, TRAINING_CONFIG, load_run

log = logging.getLogger(__name__)

RESULTS_FILE = "final.json"


class FinalEvaluation(pl.Callback):
    """Scores the final and the step-0 checkpoint of the run at the end of ``fit`` (module docstring).

    Args:
        suite: parts to run, of ``lm``, ``meta``, ``downstream``, ``numeric`` (a list or ``"lm,meta"``).
        meta_config: a ``conf/meta`` option for the meta-test episode shape; None = the run's own
            (``5way4shot`` for an AR-only run).
        episodes: meta-test tasks per checkpoint.
        seed: seed of the meta-test episodes and of a fresh head. Fixed, not the run's seed, so every
            run of a study is scored on the same episodes and the arms pair episode by episode.
        max_docs: validation documents to score (None: all of them).
        batch_size: windows per forward in the LM part.
        downstream: fields of :class:`~picomaml.eval.downstream.DownstreamConfig` (None: its defaults).
        numeric: fields of :class:`~picomaml.eval.numeric.NumericConfig` (None: its defaults).
        control_step: the control checkpoint's step (0: the random init); None scores the final one only.
        results_file: where the JSON goes (default ``<run>/eval_results/final.json``).
    """

    def __init__(
        self,
        suite: str | Sequence[str] = ("lm", "meta", "downstream"),
        meta_config: str | None = None,
        episodes: int = 200,
        seed: int = 0,
        max_docs: int | None = None,
        batch_size: int = 8,
        downstream: Mapping[str, Any] | None = None,
        numeric: Mapping[str, Any] | None = None,
        control_step: int | None = 0,
        results_file: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        # every bad value fails here, when the trainer is built, not after hours of training
        self.options = SuiteOptions(
            suite=suite,
            meta=meta_config or "auto",
            episodes=episodes,
            seed=seed,
            max_docs=max_docs,
            batch_size=batch_size,
            downstream=DownstreamConfig(**dict(downstream or {})),
            numeric=NumericConfig(**dict(numeric or {})),
        )
        if control_step is not None and control_step < 0:
            raise ValueError(f"callbacks.final_eval.control_step must be >= 0 or null, got {control_step}")
        self.control_step = control_step
        self.results_file = Path(results_file) if results_file is not None else None
        self._run_dir: Path | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        savers = [c for c in trainer.callbacks if isinstance(c, StepCheckpoints)]
        if not savers:
            raise ValueError(
                "callbacks.final_eval scores the run's checkpoints and needs callbacks.model_checkpoint "
                "(picomaml.lit.checkpointing.StepCheckpoints)"
            )
        saver = savers[0]
        assert saver.dirpath is not None  # set in its setup, which Lightning runs before on_fit_start
        scheduled = saver.steps
        if scheduled is None:
            scheduled = checkpoint_steps(
                max(trainer.max_steps, 0), saver.every_n_train_steps, saver.log_spaced_until
            )
        if self.control_step is not None and self.control_step not in scheduled:
            raise ValueError(
                f"callbacks.final_eval.control_step={self.control_step} is not a checkpoint step of "
                "callbacks.model_checkpoint; the control must be saved to be scored"
            )
        # picomaml.runs reads checkpoints from <run>/checkpoints/step_<N> beside <run>/training_config.yaml
        run_dir = saver.dirpath.parent
        if saver.dirpath.name != CHECKPOINTS_DIR or not (run_dir / TRAINING_CONFIG).is_file():
            raise ValueError(
                f"callbacks.final_eval loads checkpoints as picomaml.runs does: it needs them in "
                f"<run>/{CHECKPOINTS_DIR} beside <run>/{TRAINING_CONFIG} (picomaml.train writes it), "
                f"got {saver.dirpath}"
            )
        self._run_dir = run_dir
        model_config = getattr(pl_module, "model_config", None)
        window = self.options.downstream.window_len
        if "downstream" in self.options.suite and model_config and window > model_config.max_seq_len:
            raise ValueError(
                f"callbacks.final_eval.downstream.window_len={window} exceeds "
                f"model.max_seq_len={model_config.max_seq_len}"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted or not trainer.is_global_zero or self._run_dir is None:
            return
        start = time.perf_counter()
        results = evaluate_final(
            self._run_dir,
            trainer.global_step,
            self.control_step,
            trainer.datamodule,
            self.options,
            pl_module.device,
        )
        path = self.results_file or self._run_dir / "eval_results" / RESULTS_FILE
        write_json_atomic(path, results)
        log.info("final evaluation (%.0f s) written to %s", time.perf_counter() - start, path)


def evaluate_final(
    run_dir: Path,
    step: int,
    control_step: int | None,
    datamodule: Any,
    options: SuiteOptions,
    device: Any,
) -> dict[str, dict[str, Any]]:
    """``{"final": <scores of step>, "step0": <scores of control_step>}`` for the run in ``run_dir``
    (``"step0"`` absent when ``control_step`` is None; the key keeps its name for any control step)."""
    runner = SuiteRunner(datamodule, options, device)
    results = {"final": runner.score(load_run(run_dir, step=step))}
    if control_step is not None:
        results["step0"] = runner.score(load_run(run_dir, step=control_step))
    return results


def write_json_atomic(path: Path, data: Any) -> None:
    """``path`` holds either its old content or all of ``data``, never a part (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
