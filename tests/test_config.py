"""Every config option composes and instantiates; every bad value fails before training, naming its key."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from picomaml.config import ConfigError, group_options, resolve_precision
from picomaml.lit.optim import OptimConfig, lr_multiplier
from picomaml.train import prepare_run, train
from tests.helpers import FAST, compose_align, compose_train

GROUPS = [
    *("data", "model", "meta", "optim", "trainer", "callbacks", "logger", "debug"),
    *("experiment", "hparams_search"),
]
# options of the post-training app's root (conf/align.yaml): they read its `stage`
ALIGN_ONLY = {("callbacks", "align")}


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in group_options(g)], ids=lambda x: str(x)
)
def test_every_group_option_composes(group: str, option: str, tmp_path: Path, cache_dir: Path) -> None:
    if (group, option) in ALIGN_ONLY:
        cfg = compose_align(["stage=dpo", f"{group}={option}"], tmp_path, cache_dir)
    else:
        cfg = compose_train([f"{group}={option}"], tmp_path, cache_dir)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if group in cfg:  # debug configs are global patches rather than a section of their own
        assert cfg[group] is not None


@pytest.mark.parametrize("option", group_options("model"))
def test_model_presets_instantiate(option: str, tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_train([f"model={option}"], tmp_path, cache_dir)
    model_config = hydra.utils.instantiate(cfg.model)
    assert model_config.vocab_size == 50304


@pytest.mark.parametrize("option", ["default", "cpu", "ddp_sim"])
def test_cpu_trainers_instantiate(option: str, tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_train([*FAST, f"trainer={option}"], tmp_path, cache_dir)
    plan = prepare_run(cfg)
    assert plan.trainer.max_steps == cfg.trainer.max_steps


def test_unknown_group_option_lists_valid_names(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        compose_train(["model=12m"], tmp_path, cache_dir)
    assert "11m" in str(err.value) and "65m" in str(err.value)


def test_unknown_key_fails_in_composition(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="d_modell"):
        compose_train(["model.d_modell=64"], tmp_path, cache_dir)


def test_unknown_key_inside_a_group_file_is_named(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_train(FAST, tmp_path, cache_dir)
    with pytest.MonkeyPatch.context():
        OmegaConf.set_struct(cfg, False)
        cfg.optim.lrr = 1.0
    with pytest.raises(ConfigError, match="optim: unknown key 'lrr'"):
        prepare_run(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.seq_len=512", "data.seq_len=512 exceeds model.max_seq_len=256"),
        ("data.batch_size=0", "batch_size"),
        ("data.seq_len=-4", "seq_len"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.lr=-1e-3", "optim.lr must be > 0"),
        ("optim.decay=exp", "optim.decay must be one of linear, cosine, constant"),
        ("optim.accumulate_grad_batches=0", "optim.accumulate_grad_batches must be >= 1"),
        ("trainer.max_steps=0", "trainer.max_steps must be a positive"),
        ("model.attention_n_kv_heads=5", "attention_n_kv_heads"),
        ("data.corpus=books", "corpus"),
        ("data.tokenizer=llama", "tokenizer"),
        (
            "callbacks.learning_dynamics.layer_suffixes=[swiglu.w_9]",
            "callbacks.learning_dynamics.layer_suffixes: suffix 'swiglu.w_9' matches no module",
        ),
        ("callbacks.model_checkpoint.every_n_train_steps=0", "every_n_train_steps must be >= 1"),
        # a value of the wrong type names its key and the expected type (not a failed comparison)
        ("optim.lr=abc", "optim.lr='abc': expected a number, got str"),
        ("optim.warmup_steps=2.5", "optim.warmup_steps=2.5: expected an integer, got float"),
        ("optim.betas=[0.9,x]", r"optim.betas=\[0.9, 'x'\]: expected a list of numbers"),
        ("model.d_model=wide", "model.d_model='wide': expected an integer, got str"),
    ],
)
def test_bad_values_fail_before_training(
    override: str, message: str, tmp_path: Path, cache_dir: Path
) -> None:
    cfg = compose_train([*FAST, override], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("=", "=")):
        prepare_run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_missing_checkpoint_is_named(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_train([*FAST, f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match="no checkpoint file"):
        prepare_run(cfg)


def test_corrupt_checkpoint_is_named(tmp_path: Path, cache_dir: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    cfg = compose_train([*FAST, f"ckpt_path={bad}"], tmp_path / "run", cache_dir)
    with pytest.raises(ConfigError, match="corrupt or not a checkpoint"):
        prepare_run(cfg)


def test_used_output_dir_without_checkpoint_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step\n1\n")
    cfg = compose_train(FAST, tmp_path, cache_dir)
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run(cfg)
    assert (tmp_path / "csv" / "metrics.csv").read_text() == "step\n1\n"


def test_a_rerun_after_a_config_error_is_not_refused(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        train(compose_train([*FAST, "optim.lr=0"], tmp_path, cache_dir))
    assert not (tmp_path / "result.json").exists()  # a single run records nothing before its check
    # nothing was trained, so the corrected command may use the same dir
    assert prepare_run(compose_train(FAST, tmp_path, cache_dir)).resume_from is None


def test_precision_auto_resolves_per_device() -> None:
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("auto", "cpu") in ("32-true", "bf16-mixed")


def test_lr_schedule_warmup_then_linear_decay_to_zero() -> None:
    cfg = OptimConfig(warmup_steps=10, decay="linear")
    assert lr_multiplier(0, cfg, 100) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 100) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg, 100) == pytest.approx(0.0)
    cosine = OptimConfig(warmup_steps=0, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(50, cosine, 100) == pytest.approx(0.55)


def test_fsdp_strategy_wraps_decoder_blocks(tmp_path: Path, cache_dir: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    from picomaml.model.pico_decoder import PicoDecoderBlock

    cfg = compose_train(["trainer=fsdp"], tmp_path, cache_dir)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"].__dict__.get("_module_classes", {PicoDecoderBlock}) == {
        PicoDecoderBlock
    }
