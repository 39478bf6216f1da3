"""End-to-end training on CPU: it learns, resumes exactly, accumulates, refuses wrong checkpoints."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from picomaml.config import ConfigError
from picomaml.train import prepare_run, train
from tests.helpers import FAST, GradCapture, compose_train

REPO = Path(__file__).resolve().parents[1]


def run(overrides: list[str], output_dir: Path, cache_dir: Path) -> dict:
    return train(compose_train([*FAST, *overrides], output_dir, cache_dir))


def read_metrics(output_dir: Path) -> list[dict[str, str]]:
    with open(output_dir / "csv" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def curve(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_training_on_synthetic_data_lowers_the_loss(tmp_path: Path, cache_dir: Path) -> None:
    result = run(
        ["trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.log_every_n_steps=5"],
        tmp_path,
        cache_dir,
    )
    losses = [loss for _, loss in curve(read_metrics(tmp_path), "train/loss_ar")]
    val = curve(read_metrics(tmp_path), "val/loss")
    assert losses[-1] < losses[0] - 1.0, losses
    assert val[-1][1] < val[0][1]
    assert result["status"] == "completed" and result["global_step"] == 40
    assert result["metric"] == pytest.approx(val[-1][1])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # log-spaced until 32, then the cadence (200) is beyond the run, and the last step
    steps = sorted(int(p.name.removeprefix("step_")) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps == [0, 1, 2, 4, 8, 16, 32, 40]
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["tokens_seen"] == 40 * 4 * 32
    assert (tmp_path / "training_config.yaml").is_file()


class StopAt(pl.Callback):
    """Ends `fit` after optimizer step `step`, as a preempted job would be stopped."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, cache_dir: Path) -> None:
    common = [
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    ]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(common, straight, cache_dir)
    # the first half stops after step 6, just after a checkpoint; the rerun resumes from last.ckpt
    plan = prepare_run(compose_train([*FAST, *common], interrupted, cache_dir))
    plan.trainer.callbacks.append(StopAt(6))
    plan.trainer.fit(plan.module, datamodule=plan.datamodule)
    assert plan.trainer.global_step == 6
    result = run(common, interrupted, cache_dir)
    assert result["global_step"] == 12

    a, b = read_metrics(straight), read_metrics(interrupted)
    for key in ("train/loss_ar", "val/loss", "train/tokens_seen", "train/lr", "train/grad_norm"):
        ca, cb = dict(curve(a, key)), dict(curve(b, key))
        # stopping with should_stop runs one extra validation at the interruption step
        assert set(cb) - set(ca) <= {6} and set(ca) <= set(cb), key
        assert max(abs(ca[s] - cb[s]) for s in ca) <= 1e-6, key


def test_gradient_accumulation_equals_a_larger_batch(tmp_path: Path, cache_dir: Path) -> None:
    grads = []
    for name, overrides in {
        "big": ["data.batch_size=4"],
        "accumulated": ["data.batch_size=2", "optim.accumulate_grad_batches=2"],
    }.items():
        plan = prepare_run(
            compose_train([*FAST, "trainer.max_steps=1", *overrides], tmp_path / name, cache_dir)
        )
        capture = GradCapture()
        plan.trainer.callbacks.append(capture)
        plan.trainer.fit(plan.module, datamodule=plan.datamodule)
        grads.append(capture.grads)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    run(["trainer.max_steps=2"], tmp_path / "tiny", cache_dir)
    cfg = compose_train(
        [*FAST, "model.d_model=96", f"ckpt_path={tmp_path / 'tiny'}"], tmp_path / "other", cache_dir
    )
    with pytest.raises(
        ConfigError, match="different architecture.*model.d_model: checkpoint 48 vs config 96"
    ):
        prepare_run(cfg)


@pytest.mark.slow
def test_cli_multirun_of_two_jobs(tmp_path: Path, cache_dir: Path) -> None:
    env = {**os.environ, "PICOMAML_CACHE": str(cache_dir), "WANDB_MODE": "disabled"}
    overrides = [o for o in FAST if not o.startswith("model=")]
    cmd = [
        sys.executable, "-m", "picomaml.train", "-m", "model=tiny", "seed=1,2",
        *overrides, "trainer.max_steps=3", "trainer.val_check_interval=3", f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / str(i) / "result.json").read_text()) for i in range(2)]
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert all(r["global_step"] == 3 for r in results)


@pytest.mark.slow
def test_cli_reports_a_config_error_in_one_line(tmp_path: Path, cache_dir: Path) -> None:
    env = {**os.environ, "PICOMAML_CACHE": str(cache_dir)}
    cmd = [sys.executable, "-m", "picomaml.train", *FAST, "data.seq_len=4096", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "picomaml: config error: data.seq_len=4096 exceeds model.max_seq_len=256; use data.seq_len <= 256"
    )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_cli_rerun_of_the_same_command_resumes(tmp_path: Path, cache_dir: Path) -> None:
    env = {**os.environ, "PICOMAML_CACHE": str(cache_dir), "PICOMAML_ROOT": str(tmp_path)}
    overrides = [o for o in FAST if "enable_" not in o]
    cmd = [
        sys.executable,
        "-m",
        "picomaml.train",
        *overrides,
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]
    first = subprocess.run([*cmd, "trainer.max_steps=3"], cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    # the same command with a longer schedule continues the same run from its last.ckpt
    second = subprocess.run([*cmd, "trainer.max_steps=5"], cwd=REPO, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/last.ckpt" in second.stdout
    assert json.loads((run_dir / "result.json").read_text())["global_step"] == 5
    steps = [int(r["step"]) for r in read_metrics(run_dir) if r.get("train/loss_ar")]
    assert steps == sorted(set(steps))  # one history, no step logged twice
