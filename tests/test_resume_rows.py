"""A resumed run's ``csv/metrics.csv`` is the uninterrupted run's, row for row: the same steps with the same
columns filled and the same values, whichever checkpoint it resumed from.

What a kill leaves on disk is what was written before it: the loggers' buffered rows live in memory until
a checkpoint's save writes them. So the uninterrupted run (:func:`straight`) copies its run dir right
after each step directory is published (``latest`` moved to it), which is the earliest moment a rerun
resumes from that step, and each copy is resumed in place as a rerun of the same command would. A
SIGTERM (what SLURM sends on preemption, :mod:`picomaml.lit.slurm`) gets the same treatment: a copy
right after its save of ``last.ckpt``.

One small hybrid run: 4 steps, checkpoints at 0, 1, 2, 3, 4 (log-spaced, every 3, the end), validation
at 2 and 4, the periodic evaluation at 3 (its cadence is the checkpoints'), logging every 2 steps, the
learning dynamics at every checkpoint.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from picomaml.lit import checkpointing
from picomaml.lit.checkpoint_io import AtomicCheckpointIO
from picomaml.lit.slurm import PreemptionCheckpoint
from picomaml.train import prepare_run, save_training_config, train
from tests.helpers import META, compose_train

SCHEDULE = [0, 1, 2, 3, 4]
COMMON = [
    *META,
    "meta.hybrid_ratio=0.5",
    "meta.val_episodes=2",
    "data.val_batches=2",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.learning_dynamics.val_batch_size=4",
]
TIMING = {"train/tokens_per_s"}  # wall-clock throughput: never the same twice


def logged_rows(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """Every row of metrics.csv as (step, {filled column: value}), timing left out, in a fixed order."""
    with open(run_dir / "csv" / "metrics.csv") as file:
        rows = [
            (int(row["step"]), {k: float(v) for k, v in row.items() if v and k != "step" and k not in TIMING})
            for row in csv.DictReader(file)
        ]
    return sorted(rows, key=lambda row: (row[0], sorted(row[1])))


def assert_same_rows(resumed: Path, straight: Path) -> None:
    got, want = logged_rows(resumed), logged_rows(straight)
    assert [(step, sorted(values)) for step, values in got] == [
        (step, sorted(values)) for step, values in want
    ]
    for (step, a), (_, b) in zip(got, want, strict=True):
        worst = max(abs(a[k] - b[k]) for k in a)
        assert worst <= 1e-6, f"step {step}: {a} != {b}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Path]:
    """(the run dir, the folder of its copies ``at_step_<N>``, each taken as step N was published)."""
    root = tmp_path_factory.mktemp("resume_rows")
    run_dir, copies = root / "straight", root / "copies"
    publish = checkpointing._symlink_atomic

    def publish_then_copy(target: str, link: Path) -> None:
        publish(target, link)
        if link.name == "latest" and link.parent == run_dir / "checkpoints":
            shutil.copytree(run_dir, copies / f"at_{target}", symlinks=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpointing, "_symlink_atomic", publish_then_copy)
        result = train(compose_train(COMMON, run_dir, cache_dir))
    assert result["status"] == "completed" and result["global_step"] == 4
    return run_dir, copies


def test_the_run_logs_what_the_comparisons_rely_on(straight: tuple[Path, Path]) -> None:
    run_dir, copies = straight
    columns = {step: set() for step in range(5)}
    for step, values in logged_rows(run_dir):
        columns[step] |= set(values)
    assert {"val/loss", "meta_test/query_acc", "train/loss_ar"} <= columns[2]
    assert {"val/loss", "meta_test/query_acc", "train/loss_ar"} <= columns[4]
    assert "eval/top1_acc" in columns[3] and "val/loss" not in columns[3]
    assert sorted(p.name for p in copies.iterdir()) == [f"at_step_{s}" for s in SCHEDULE]


@pytest.mark.parametrize("step", SCHEDULE)
def test_a_run_killed_after_publishing_a_step_resumes_to_the_same_rows(
    straight: tuple[Path, Path], cache_dir: Path, step: int
) -> None:
    """0: the initial weights; 1: inside a logging window; 2: a logging and validation step; 3: the
    periodic evaluation's step; 4: the last step, which validates."""
    run_dir, copies = straight
    killed = copies / f"at_step_{step}"
    assert os.readlink(killed / "checkpoints" / "latest") == f"step_{step}"
    result = train(compose_train(COMMON, killed, cache_dir))
    assert result["status"] == "completed" and result["global_step"] == 4
    assert_same_rows(killed, run_dir)


class SigtermAt(pl.Callback):
    """Sends this process SIGTERM after optimizer step ``step``, as SLURM does before a preemption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_job_preempted_after_its_signal_save_resumes_to_the_same_rows(
    straight: tuple[Path, Path], tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM after step 1: last.ckpt is saved at step 2, the next logging step, which also validates.
    A job requeued right after that save resumes from it to the uninterrupted rows, and completes step 2's
    directory, which the requeued job never wrote."""
    run_dir = tmp_path / "preempted"
    killed = tmp_path / "killed"
    save = AtomicCheckpointIO.save_checkpoint

    def save_then_copy(
        self: AtomicCheckpointIO, checkpoint: dict, path: Any, storage_options: Any = None
    ) -> None:
        save(self, checkpoint, path, storage_options)
        if Path(path).name == "last.ckpt":  # step checkpoints are linked, never saved, as last.ckpt
            shutil.copytree(run_dir, killed, symlinks=True)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_copy)
    cfg = compose_train(COMMON, run_dir, cache_dir)
    plan = prepare_run(cfg)
    plan.trainer.callbacks += [PreemptionCheckpoint(run_dir / "checkpoints" / "last.ckpt"), SigtermAt(1)]
    plan.output_dir.mkdir(parents=True)
    save_training_config(cfg, plan.output_dir)
    plan.trainer.fit(plan.module, datamodule=plan.datamodule)
    monkeypatch.undo()
    assert killed.is_dir(), "no signal save"

    result = train(compose_train(COMMON, killed, cache_dir))
    assert result["status"] == "completed" and result["global_step"] == 4
    assert_same_rows(killed, straight[0])
    step_2 = killed / "checkpoints" / "step_2"
    assert {"checkpoint.ckpt", "model.safetensors", "config.json", "learning_dynamics"} <= {
        p.name for p in step_2.iterdir()
    }
    assert os.readlink(killed / "checkpoints" / "latest") == "step_4"
