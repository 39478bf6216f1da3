"""`python -m picomaml.align`: post-train a picomaml checkpoint by SFT, then DPO.

    python -m picomaml.align stage=sft ckpt_path=outputs/train/runs/<run> data=synthetic
    python -m picomaml.align stage=dpo ckpt_path=outputs/align/runs/<sft run> stage.beta=0.1
    python -m picomaml.align -m stage=dpo ckpt_path=<sft run> stage.beta=0.1,0.5      # a sweep

A Hydra app composed like `picomaml.train` (root config `conf/align.yaml`: the same data, optim,
trainer, logger, paths and launcher groups, plus the `stage` group), run by the same `train` function,
so a run gets the same run dir naming, config check before any write, lock, `result.json`, step
checkpoints, CSV metrics and resume (rerunning a command continues its run dir). The model is the
checkpoint's: `ckpt_path` (a run dir, a `checkpoints/step_<N>` dir or a `.ckpt`) is required, and part
of the run's name, since it says what the run is.

- `stage=sft` continues next-token training on `data=` from the checkpoint's weights, with a fresh
  optimizer and schedule, and writes an ordinary run dir.
- `stage=dpo` initialises the policy from the checkpoint (normally the SFT run) and keeps a frozen copy
  as the reference; the pairs come from `data=` (`picomaml.align.preferences`). Validation logs
  `val/dpo_loss`, `val/pref_acc` and friends, early stopping watches `stage.monitor`, and after training
  the test pairs are scored: `test/*` metrics, and `eval_results/dpo_test.json` with the test metrics
  before (step 0) and after DPO. "After" is the policy of the best validation (`stage.test_on=best`,
  whose `stage.monitor` value is then also what the run returns to sweepers) or the final one
  (`stage.test_on=last`); the run dir's checkpoints hold the final policy.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from picomaml.align.config import DPOStage, SFTStage
from picomaml.align.module import DPOLitModule
from picomaml.align.preferences import PreferenceDataModule
from picomaml.config import ConfigError, instantiate_section, register_bases, register_resolvers
from picomaml.lit.module import DivergenceError, PicoLitModule
from picomaml.runs import (
    TRAINING_CONFIG,
    RunError,
    check_architecture,
    read_checkpoint,
    resolve_checkpoint,
    resume_checkpoint,
    saved_model_config,
)
from picomaml.train import CONFIG_SCHEMAS, PruningListener, RunPlan, build_trainer, train

log = logging.getLogger(__name__)
RESULTS_FILE = Path("eval_results") / "dpo_test.json"
STAGE_REQUIRED = "stage is required: stage=sft (fine-tuning) or stage=dpo (preference optimization)"
register_resolvers()
register_bases(CONFIG_SCHEMAS)


def load_start(ckpt_path: str | None) -> tuple[Path, Path, dict]:
    """``(run dir, checkpoint file, checkpoint)`` of the model to post-train; ConfigError naming
    ``ckpt_path`` when it is missing or not a picomaml checkpoint."""
    if not ckpt_path:
        raise ConfigError(
            "ckpt_path is required: the picomaml checkpoint to post-train (a run dir, a "
            "checkpoints/step_<N> dir or a .ckpt), e.g. ckpt_path=outputs/train/runs/<run>"
        )
    try:
        run_dir, path = resolve_checkpoint(ckpt_path)
        return run_dir, path, read_checkpoint(path)
    except (RunError, FileNotFoundError) as err:
        raise ConfigError(f"ckpt_path={ckpt_path}: {err}") from err


def prepare_align(cfg: DictConfig) -> RunPlan:
    """Build and check an SFT or DPO run from `cfg` (the `picomaml.train.prepare_run` of this app)."""
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("stage") is None:
        raise ConfigError(STAGE_REQUIRED)
    stage: SFTStage | DPOStage = instantiate_section(cfg, "stage")
    run_dir, start_path, checkpoint = load_start(cfg.get("ckpt_path"))
    model_config = saved_model_config(checkpoint)
    init_state = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    optim = instantiate_section(cfg, "optim")
    data = instantiate_section(cfg, "data")

    start_tokenizer = OmegaConf.select(
        OmegaConf.load(run_dir / TRAINING_CONFIG), "data.tokenizer", default="gpt2"
    )
    if cfg.data.tokenizer != start_tokenizer:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} but the checkpoint {start_path} was trained with "
            f"{start_tokenizer!r}; use data.tokenizer={start_tokenizer}"
        )
    if cfg.data.seq_len > model_config.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the checkpoint's "
            f"model.max_seq_len={model_config.max_seq_len}"
        )
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        raise ConfigError(
            f"trainer.max_steps must be a positive number of steps, got {cfg.trainer.max_steps}"
        )

    # ckpt_path is where this run starts; a rerun of the command resumes from its own run dir
    resume_from = resume_checkpoint(None, output_dir)
    resume_step = None if resume_from is None else check_architecture(resume_from, model_config)
    after_fit = None
    try:
        if isinstance(stage, SFTStage):
            data.check()
            datamodule = data
            module = PicoLitModule(model_config, optim, seq_len=cfg.data.seq_len, seed=cfg.seed)
            module.model.load_state_dict(init_state)
        else:
            datamodule = PreferenceDataModule(data, stage)
            datamodule.check()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if isinstance(stage, DPOStage):
        if datamodule.max_len > model_config.max_seq_len + 1:
            raise ConfigError(
                f"a preference pair holds {datamodule.max_len} tokens, more than the checkpoint's "
                f"model.max_seq_len={model_config.max_seq_len} + 1; lower stage.prompt_tokens or "
                "stage.response_tokens"
            )
        module = DPOLitModule(
            model_config,
            optim,
            init_state,
            beta=stage.beta,
            length_normalize=stage.length_normalize,
            seq_len=datamodule.max_len - 1,
            seed=cfg.seed,
            results_path=output_dir / RESULTS_FILE,
            monitor=stage.monitor,
            monitor_mode=stage.monitor_mode,
        )
    module.validation_listeners.append(PruningListener(cfg))
    trainer = build_trainer(cfg, optim, output_dir, resume_step)
    if isinstance(stage, DPOStage):

        def after_fit() -> dict[str, float]:
            best = module.use_best_policy() if stage.test_on == "best" else {}
            trainer.test(module, datamodule=datamodule, verbose=False)
            return {**{k: float(v) for k, v in trainer.callback_metrics.items()}, **best}

    # the run dir reads like a training run's: its model section, and the checkpoint it started from
    with open_dict(cfg):
        cfg.model = {"_target_": "picomaml.model.ModelConfig", **dataclasses.asdict(model_config)}
        cfg.start_checkpoint = str(start_path)
    return RunPlan(output_dir, module, datamodule, trainer, resume_from, after_fit=after_fit)


@hydra.main(version_base="1.3", config_path="../conf", config_name="align")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("stage") is None:  # before train() reads optimized_metric, which is the stage's monitor
        raise SystemExit(f"picomaml: config error: {STAGE_REQUIRED}")
    try:
        return train(cfg, prepare=prepare_align)["metric"]
    except (ConfigError, DivergenceError) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # sweepers record the job's exception as that trial's failure, and go on
        if isinstance(err, DivergenceError):
            raise SystemExit(f"picomaml: {err}") from err
        raise SystemExit(f"picomaml: config error: {err}") from err


if __name__ == "__main__":
    main()
