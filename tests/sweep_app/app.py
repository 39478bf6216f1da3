"""A tiny Hydra task that behaves like a training run, for testing sweeps without training.

Its "validation loss" at step t is ``(x - 0.3)^2 + (y - 0.7)^2 + model.offset + 1 / (t + 1)`` and its
"validation accuracy" ``1 - (x - 0.8)^2 - (y - 0.7)^2 / 2 - model.offset``, best at another x, so the
two trade off along x in [0.3, 0.8] (the Pareto front of a multi-objective sweep). It returns the
``optimized_metric`` (one key, or a list of keys: multi-objective) as ``picomaml.train`` does, reports
each value to the optuna trial (so pruners work), writes a Lightning-CSVLogger-like
``csv/version_0/metrics.csv``, the ``result.json`` that picomaml.train writes, ``timing.json``
(wall-clock start and end of the task, for the asynchrony checks) and ``step_clock.json``
(``picomaml.sweep.clock``: process start, first and last step, for the overhead benchmark). Knobs in
``conf/config.yaml`` make some trials slow (``slow_trial``: a trial number or a list of them), raise
(large x), or return NaN (large y).
"""

import csv
import json
import math
import os
import time
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

from picomaml.sweep import trial_reporter
from picomaml.sweep.clock import StepClock
from picomaml.sweep.objectives import objective_values


def loss_at(cfg: DictConfig, step: int) -> float:
    return (cfg.x - 0.3) ** 2 + (cfg.y - 0.7) ** 2 + cfg.model.offset + 1.0 / (step + 1)


def acc_at(cfg: DictConfig) -> float:
    return 1.0 - (cfg.x - 0.8) ** 2 - 0.5 * (cfg.y - 0.7) ** 2 - cfg.model.offset


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float] | None:
    started = time.time()
    out = Path(HydraConfig.get().runtime.output_dir)
    job = {"pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    (out / "timing.json").write_text(json.dumps({"start": started, **job}))
    reporter = trial_reporter(cfg)
    clock = StepClock(out)
    metrics = out / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    status, value, step = "failed", math.nan, 0
    sleep = cfg.step_sleep
    slow = cfg.slow_trial if isinstance(cfg.slow_trial, ListConfig) else [cfg.slow_trial]
    if cfg.sweep.trial_number is not None and cfg.sweep.trial_number in slow:
        sleep += cfg.slow_step_sleep
    try:
        if cfg.fail_above is not None and cfg.x > cfg.fail_above:
            raise RuntimeError(f"x={cfg.x} is above fail_above={cfg.fail_above}")
        with metrics.open("w", newline="") as f:
            # sparse rows, as Lightning's CSVLogger writes them: train and val metrics on separate rows
            writer = csv.writer(f)
            writer.writerow(["epoch", "step", "train/loss", "val/loss", "val/acc"])
            for step in range(cfg.steps):
                clock.step_start()
                time.sleep(sleep)
                value = loss_at(cfg, step)
                clock.step_end()
                writer.writerow([0, step, value + 0.05, "", ""])
                writer.writerow([0, step, "", value, acc_at(cfg)])
                f.flush()
                reporter.report(step, value)
                if reporter.should_prune():
                    status = "pruned"
                    raise optuna.TrialPruned(f"pruned at step {step}")
        if cfg.nan_above is not None and cfg.y > cfg.nan_above:
            value = math.nan
        returned = objective_values(cfg.optimized_metric, {"val/loss": value, "val/acc": acc_at(cfg)})
        status = "completed"
        return returned
    finally:
        ended = time.time()
        result = {
            "metric": value,
            "status": status,
            "wall_time_s": ended - started,
            "tokens_seen": 1000 * step,
        }
        (out / "result.json").write_text(json.dumps(result))
        (out / "timing.json").write_text(json.dumps({"start": started, "end": ended, **job}))


if __name__ == "__main__":
    main()
