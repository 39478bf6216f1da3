"""`python -m picomaml.train`: compose the config, check it, build data + model + trainer, fit, return.

    python -m picomaml.train model=11m meta=5way4shot                      # one run
    python -m picomaml.train -m model=tiny,small optim.lr=3e-4,1e-3        # a sweep (Hydra multirun)
    python -m picomaml.train model=11m run_name=demo                        # rerun the same line: resumes

Everything that can be wrong with a config is found by `prepare_run` before the first step. The return
value (the last validation's `optimized_metric`) is what Hydra sweepers optimise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from picomaml.config import (
    ConfigError,
    instantiate_section,
    register_bases,
    register_resolvers,
    resolve_precision,
)
from picomaml.lit.checkpoint_io import AtomicCheckpointIO
from picomaml.lit.checkpointing import StepCheckpoints
from picomaml.lit.dynamics import LearningDynamics, match_modules
from picomaml.lit.loggers import ResumableCSVLogger
from picomaml.lit.memory import check_fits, is_out_of_memory
from picomaml.lit.module import DivergenceError, PicoLitModule
from picomaml.lit.optim import OptimConfig
from picomaml.lit.slurm import check_slurm_tasks, preemption_callbacks, submitit_plugins
from picomaml.meta import MetaConfig
from picomaml.model import ModelConfig
from picomaml.runs import RESULT_FILE, RunLock, check_architecture, resume_checkpoint
from picomaml.sweep import trial_reporter
from picomaml.sweep.objectives import MissingMetricError, is_multi_objective, metric_names, objective_values
from picomaml.utils.config_tree import print_config_tree

log = logging.getLogger(__name__)
# the `base` option of these groups is the dataclass at its defaults (see picomaml.config.base_node)
CONFIG_SCHEMAS = {"meta": MetaConfig, "optim": OptimConfig}
register_resolvers()
register_bases(CONFIG_SCHEMAS)


@dataclass
class RunPlan:
    """Everything `train` needs, built and checked from the config before any training starts."""

    output_dir: Path
    module: PicoLitModule
    datamodule: pl.LightningDataModule
    trainer: pl.Trainer
    resume_from: Path | None
    # run after a completed fit; its metrics join the result's (picomaml.align tests its policy here)
    after_fit: Callable[[], dict[str, float]] | None = None


def prepare_run(cfg: DictConfig) -> RunPlan:
    """Instantiate and cross-check every config section; raises ConfigError with the offending key."""
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    model_config: ModelConfig = instantiate_section(cfg, "model")
    optim: OptimConfig = instantiate_section(cfg, "optim")
    meta: MetaConfig = instantiate_section(cfg, "meta")
    datamodule = instantiate_section(cfg, "data")
    for key, length in (("data.seq_len", cfg.data.seq_len), ("meta.window_len", meta.window_len)):
        if length > model_config.max_seq_len and (key == "data.seq_len" or meta.enabled):
            raise ConfigError(
                f"{key}={length} exceeds model.max_seq_len={model_config.max_seq_len}; "
                f"use {key} <= {model_config.max_seq_len}"
            )
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        raise ConfigError(
            f"trainer.max_steps must be a positive number of steps, got {cfg.trainer.max_steps}"
        )
    # a run predicted over the machine's memory stops here, not at its first step (memory_check=false)
    check_fits(cfg)

    resume_from = resume_checkpoint(cfg.ckpt_path, output_dir)
    resume_step = None if resume_from is None else check_architecture(resume_from, model_config)

    try:
        datamodule.check()  # reads the data now, AR-only runs too: a bad file fails here, not inside fit
        if meta.enabled:
            datamodule.setup_meta(meta)  # builds the word index: too few eligible words fail here
    except ValueError as err:
        raise ConfigError(str(err)) from err
    module = PicoLitModule(model_config, optim, seq_len=cfg.data.seq_len, meta=meta, seed=cfg.seed)
    module.validation_listeners.append(PruningListener(cfg))
    trainer = build_trainer(cfg, optim, output_dir, resume_step)
    for callback in trainer.callbacks:
        if isinstance(callback, LearningDynamics):
            try:
                match_modules(module.model, callback.layer_suffixes)
            except ValueError as err:
                raise ConfigError(str(err)) from err
    return RunPlan(output_dir, module, datamodule, trainer, resume_from)


def build_trainer(
    cfg: DictConfig, optim: OptimConfig, output_dir: Path, resume_step: int | None
) -> pl.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(
        trainer_cfg.get("precision", "auto"), trainer_cfg["accelerator"]
    )
    # Lightning counts val_check_interval in micro-batches; the config speaks in optimizer steps.
    if isinstance(trainer_cfg.get("val_check_interval"), int):
        trainer_cfg["val_check_interval"] *= optim.accumulate_grad_batches
    # in a submitit job: SIGTERM must not end fit and a requeue signal first saves last.ckpt
    callbacks = [*_instantiate_group(cfg, "callbacks"), *preemption_callbacks(output_dir)]
    _attach_hub_uploader(cfg, callbacks, output_dir)
    loggers = list(_instantiate_group(cfg, "logger", output_dir=output_dir))
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.resume_step = resume_step
    try:
        trainer = hydra.utils.instantiate(
            trainer_cfg,
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO(), *submitit_plugins()],
        )
    except Exception as err:
        raise ConfigError(f"trainer: {err}") from err
    check_slurm_tasks(trainer)  # in a multi-task SLURM job: trainer.devices x num_nodes = the job's tasks
    return trainer


def _attach_hub_uploader(cfg: DictConfig, callbacks: list[pl.Callback], output_dir: Path) -> None:
    """With `checkpointing.push_to_hub`, the step checkpoints also go to the Hub (picomaml.lit.hub)."""
    hub = cfg.get("checkpointing") or {}
    if not hub.get("push_to_hub"):
        return
    if not hub.get("hub_repo_id"):
        raise ConfigError("checkpointing.push_to_hub=true needs checkpointing.hub_repo_id=<namespace>/<name>")
    savers = [c for c in callbacks if isinstance(c, StepCheckpoints)]
    if not savers:
        raise ConfigError(
            "checkpointing.push_to_hub=true needs callbacks.model_checkpoint (use callbacks=default)"
        )
    from picomaml.lit.hub import HubUploader

    # one branch per run, as pico-train: the run dir's name (sweep dir + job number in a multirun)
    name = hub.get("hub_branch") or (
        f"{output_dir.parent.name}-{output_dir.name}" if output_dir.name.isdigit() else output_dir.name
    )
    try:
        savers[0].uploader = HubUploader(
            str(hub.hub_repo_id), re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)), private=bool(hub.private)
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _instantiate_group(cfg: DictConfig, key: str, output_dir: Path | None = None) -> Any:
    section = cfg.get(key) or {}
    for name in section:
        entry = section[name]
        if entry is None:
            continue
        if key == "logger" and "WandbLogger" in str(entry.get("_target_")) and entry.get("id") is None:
            # one stable wandb run per output dir, so requeued and resumed jobs continue the same run
            with open_dict(entry):
                entry.id = hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16]
        try:
            yield hydra.utils.instantiate(entry)
        except Exception as err:
            raise ConfigError(f"{key}.{name}: {err}") from err


class PruningListener:
    """Reports each validation's `optimized_metric` to the optuna trial this job runs (if any) and
    stops training when the study's pruner says so; outside an optuna sweep it does nothing.

    A class rather than a closure so that it pickles into `ddp_spawn` worker processes; the reporter
    (a storage connection) is opened lazily in the process that uses it.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._reporter: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "_reporter": None}

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self._reporter is None:
            self._reporter = trial_reporter(self.cfg)
        # a list of metrics is a multi-objective study, which optuna cannot prune
        if is_multi_objective(self.cfg.optimized_metric):
            return
        # With several ranks, rank 0 alone reports and asks the pruner, and every rank follows its
        # verdict: ranks asking the study themselves could disagree (another trial may report in
        # between), and a rank that stops alone leaves the others waiting in the next collective.
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        verdict = [False]
        rank_zero = not distributed or dist.get_rank() == 0
        if rank_zero and self._reporter.active and self.cfg.optimized_metric in metrics:
            self._reporter.report(step, metrics[self.cfg.optimized_metric])
            verdict[0] = self._reporter.should_prune()
        if distributed and OmegaConf.select(self.cfg, "sweep.trial_number") is not None:
            dist.broadcast_object_list(verdict, src=0)  # (the same config, so every rank gets here)
        if verdict[0]:
            raise optuna.TrialPruned(f"pruned at step {step}")


def train(cfg: DictConfig, prepare: Callable[[DictConfig], RunPlan] = prepare_run) -> dict[str, Any]:
    """Run one training job and return `{"metric", "status", "wall_time_s", "tokens_seen", ...}`.

    `prepare` builds the run from the config (`prepare_run`; `picomaml.align` passes its own).
    Nothing in the run dir changes until the whole config has been checked (`prepare`): a single
    run whose config is wrong leaves an existing run exactly as it was and no new directory behind.
    After the check, the same dict is written to `<output_dir>/result.json` (also when the job fails) so
    sweep reports can read every job, finished or not; in a multirun, whose job dirs are always new, a
    job that fails its config check records that too, so the sweep shows it.
    """
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    multirun = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    # the other ranks of a multi-task SLURM job run this same function and write nothing in the run dir
    owner = _is_owner_process()
    if not owner:
        _leave_run_log_to_owner(output_dir)
    if multirun and owner:
        write_hydra_record(cfg, hydra_cfg, output_dir)
    name = cfg.optimized_metric
    if is_multi_objective(name):  # a list of keys: a multi-objective sweep
        name = metric_names(name)
    result: dict[str, Any] = {"metric": None, "metric_name": name, "status": "failed"}
    record = multirun
    lock = RunLock(output_dir)
    try:
        try:
            plan = prepare(cfg)
        except ConfigError:
            if not multirun:
                _discard_if_new(output_dir, hydra_cfg)
            raise
        if owner:
            lock.acquire()  # checked and not yet written: a second identical command stops here
            output_dir.mkdir(parents=True, exist_ok=True)
        record = True
        if owner:
            if hydra_cfg is not None and not multirun:
                write_hydra_record(cfg, hydra_cfg, output_dir)
            print_config_tree(cfg, save_to=output_dir / "config_tree.log")
            save_training_config(cfg, output_dir)
        if plan.resume_from is not None:
            log.info("resuming from %s", plan.resume_from)
        plan.trainer.fit(plan.module, datamodule=plan.datamodule, ckpt_path=plan.resume_from)
        metrics = {k: float(v) for k, v in plan.trainer.callback_metrics.items()}
        if plan.after_fit is not None:
            metrics.update(plan.after_fit())
        result["world_size"] = plan.trainer.world_size  # ranks that trained (devices x num_nodes)
        result.update(
            global_step=plan.trainer.global_step, tokens_seen=plan.module.tokens_seen, metrics=metrics
        )
        # one value, or a list in the order of a list `optimized_metric` (multi-objective sweeps)
        result.update(metric=objective_values(cfg.optimized_metric, metrics), status="completed")
        return result
    except BaseException as err:
        result["error"] = f"{type(err).__name__}: {err}"
        if isinstance(err, optuna.TrialPruned):
            result["status"] = "pruned"
        elif isinstance(err, DivergenceError):
            result.update(status="diverged", diverged_at_step=err.step)
        elif is_out_of_memory(err):
            result["status"] = "oom"  # sweeps record the trial as oom (picomaml.sweep.memory_budget)
        raise
    finally:
        result["wall_time_s"] = time.time() - start
        _finish_wandb()
        try:
            if record and _is_rank_zero():
                from picomaml.lit.checkpoint_io import write_atomic

                text = json.dumps(result, indent=2)
                write_atomic(output_dir / RESULT_FILE, lambda tmp: tmp.write_text(text))
        except OSError as err:
            if "error" not in result:
                raise
            # the run's own error is on its way out: a failed record (a full disk, say) must not replace it
            log.error("could not record the failed run in %s: %s", output_dir / RESULT_FILE, err)
        finally:
            lock.release()


def write_hydra_record(cfg: DictConfig, hydra_cfg: DictConfig, output_dir: Path) -> None:
    """`.hydra/{config,hydra,overrides}.yaml`, as Hydra writes them. Hydra's own write happens before
    the job starts (`hydra.output_subdir: null` turns it off), so it would overwrite the record of an
    existing run even when the new config turns out to be wrong; picomaml writes it after the check."""
    record = output_dir / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), record / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), record / "overrides.yaml")


def _discard_if_new(output_dir: Path, hydra_cfg: DictConfig | None) -> None:
    """Remove the run dir Hydra created for a command whose config failed its check, when it holds
    nothing but Hydra's (empty or error-only) job log: nothing was trained, so nothing is lost."""
    if not output_dir.is_dir():
        return
    job_log = f"{hydra_cfg.job.name}.log" if hydra_cfg is not None else None
    entries = list(output_dir.iterdir())
    if all(p.name == job_log and p.is_file() for p in entries):
        for p in entries:
            p.unlink()
        output_dir.rmdir()


def save_training_config(cfg: DictConfig, output_dir: Path) -> None:
    """`training_config.yaml` in pico-train's shape, so pico-analyze reads the run unchanged."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.setdefault("checkpointing", {})["run_name"] = cfg.run_name or output_dir.name
    (output_dir / "training_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))


def _is_owner_process() -> bool:
    """The process that owns the run dir: not a worker that a distributed launcher started (those run
    the same command with RANK / LOCAL_RANK set, or SLURM_PROCID in a multi-task SLURM job)."""
    import os

    return all(os.environ.get(key, "0") in ("", "0") for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def _is_rank_zero() -> bool:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return _is_owner_process() and (not initialized or torch.distributed.get_rank() == 0)


def _leave_run_log_to_owner(output_dir: Path) -> None:
    """Hydra points every process's log file handler at ``<run>/<job name>.log``; a rank that does not
    own the run dir drops it, so the run's log is rank 0's alone (the other ranks of a SLURM job still
    log to their submitit task logs, ``.submitit/<job>/<job>_<rank>_log.{out,err}``)."""
    run_dir = output_dir.resolve()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            root.removeHandler(handler)
            handler.close()


def _finish_wandb() -> None:
    # multirun jobs share one process on the basic launcher: close each job's wandb run before the next
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    try:
        return train(cfg)["metric"]
    except (ConfigError, DivergenceError, MissingMetricError) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # sweepers record the job's exception as that trial's failure, and go on
        if isinstance(err, (DivergenceError, MissingMetricError)):
            raise SystemExit(f"picomaml: {err}") from err
        # one line naming the key, not a traceback: nothing has been trained or overwritten yet
        raise SystemExit(f"picomaml: config error: {err}") from err


if __name__ == "__main__":
    main()
