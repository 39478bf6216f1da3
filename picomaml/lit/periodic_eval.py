"""A light evaluation every few hundred steps during training (:func:`picomaml.eval.light.evaluate_light`).

Validation already gives ``val/loss`` and meta-test accuracy; this adds what the evaluation CLI reports,
on the run's fixed validation micro-batches and a few meta-test episodes, so learning curves of
``eval/ppl_doc_mean``, ``eval/top1_acc``, ``eval/top5_acc`` and ``eval/meta_query_acc`` (with its CI)
sit beside the training curves. Each evaluation is logged under ``eval/`` at the step it ran and
written to ``<run>/eval_results/step_<N>_light.json`` (the CLI's full evaluation writes
``step_<N>.json``). It runs on global rank 0 and leaves the training trajectory unchanged (no optimizer,
RNG or ``.grad`` is touched; see ``evaluate_light``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from picomaml.eval.downstream import DownstreamConfig
from picomaml.eval.light import evaluate_light
from picomaml.eval.meta import load_meta_config


class PeriodicEvaluation(pl.Callback):
    """Runs ``evaluate_light`` after every ``every_n_steps`` optimizer steps (and never at step 0).

    Args:
        every_n_steps: optimizer steps between two evaluations.
        episodes: meta-test episodes per evaluation (0: no meta-test accuracy). A run without a meta
            head is scored with a fresh, seeded head of ``meta_config`` (the AR baseline); an AR run
            without ``meta_config`` gets no meta-test keys.
        max_val_batches: validation micro-batches to score (None: all of the datamodule's).
        meta_config: a meta config name (``conf/meta/<name>.yaml``) for runs trained without one.
        downstream: keys of :class:`~picomaml.eval.downstream.DownstreamConfig` for few-shot accuracy on
            the real labelled tasks (head-only; keep it light: one k, a few episodes, no fine-tuning);
            None turns it off.
        results_dir: where the JSON files go (default ``<trainer.default_root_dir>/eval_results``).
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        episodes: int = 8,
        max_val_batches: int | None = 4,
        meta_config: str | None = None,
        results_dir: str | os.PathLike | None = None,
        downstream: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"callbacks.periodic_eval.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.episodes = episodes
        self.max_val_batches = max_val_batches
        self.meta_config = meta_config
        self.results_dir = Path(results_dir) if results_dir is not None else None
        try:
            self.downstream = DownstreamConfig(**downstream) if downstream is not None else None
        except (TypeError, ValueError) as err:
            raise ValueError(f"callbacks.periodic_eval.downstream: {err}") from err
        self._last_step = -1
        self._meta: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.results_dir is None:
            self.results_dir = Path(trainer.default_root_dir) / "eval_results"
        if self.meta_config is not None:
            self._meta = load_meta_config(self.meta_config)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps != 0 or step == 0:
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        results = evaluate_light(
            pl_module,
            trainer.datamodule,
            meta_config=self._meta,
            episodes=self.episodes,
            max_val_batches=self.max_val_batches,
            seed=getattr(pl_module, "seed", 0),
            downstream=self.downstream,
        )
        metrics = {f"eval/{k}": float(v) for k, v in results.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        assert self.results_dir is not None
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"step_{step}_light.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"step": step, "kind": "light", **results}, indent=2))
        os.replace(tmp, path)
