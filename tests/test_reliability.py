"""Runs that trust nothing: a bad last.ckpt falls back to a step that loads, and a failed start changes
nothing on disk (issue 11)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picomaml.config import ConfigError
from picomaml.runs import resume_checkpoint
from picomaml.train import prepare_run, train
from tests.helpers import FAST, REPO, compose_train

STEPS = [
    "trainer.max_steps=4",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.val_check_interval=2",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A 4-step run with checkpoints at steps 0, 1, 2, 4 (last.ckpt = step 4)."""
    run_dir = tmp_path_factory.mktemp("finished")
    assert train(compose_train([*FAST, *STEPS], run_dir, cache_dir))["status"] == "completed"
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@pytest.mark.parametrize(
    ("damage", "expected"),
    [("garbage", "step_4"), ("truncate", "step_2"), ("delete", "step_4")],
)
def test_a_bad_last_ckpt_falls_back_to_the_newest_step_that_loads(
    damage: str, expected: str, finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _copy(finished_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.ckpt"
    if damage == "garbage":  # a new file: step_4's checkpoint (its former hard link) stays intact
        last.unlink()
        last.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "truncate":  # last.ckpt is a hard link to step_4's checkpoint: both are truncated
        with open(last, "r+b") as file:
            file.truncate(1000)
    else:
        last.unlink()
    with caplog.at_level(logging.WARNING, logger="picomaml.runs"):
        chosen = resume_checkpoint(None, run_dir)
    assert chosen == run_dir / "checkpoints" / expected / "checkpoint.ckpt"
    assert any(expected in r.getMessage() and "last.ckpt" in r.getMessage() for r in caplog.records)


def test_nothing_loadable_names_ckpt_path(finished_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(finished_run, tmp_path / "run")
    for ckpt in (run_dir / "checkpoints").rglob("*.ckpt"):
        if not ckpt.is_symlink():
            ckpt.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"cannot be read.*ckpt_path="):
        resume_checkpoint(None, run_dir)


def test_a_rerun_resumes_from_the_fallback_and_finishes(
    finished_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = _copy(finished_run, tmp_path / "run")
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    steps = [s for s in STEPS if "max_steps" not in s]
    result = train(compose_train([*FAST, *steps, "trainer.max_steps=6"], run_dir, cache_dir))
    assert (result["status"], result["global_step"]) == ("completed", 6)


def _snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_failed_start_changes_nothing_on_disk(tmp_path: Path, cache_dir: Path) -> None:
    env = {**os.environ, "PICOMAML_CACHE": str(cache_dir), "PICOMAML_ROOT": str(tmp_path)}
    overrides = [o for o in FAST if "enable_" not in o] + ["trainer.enable_progress_bar=false"]
    cmd = [sys.executable, "-m", "picomaml.train", *overrides, "run_name=done"]
    first = subprocess.run([*cmd, "trainer.max_steps=2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = next((tmp_path / "outputs").rglob("done"))
    before = _snapshot(run_dir)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert {".hydra/config.yaml", ".hydra/overrides.yaml"} <= set(before)

    # trainer.max_steps does not enter the run name: the same dir, a config that fails its check
    bad = subprocess.run([*cmd, "trainer.max_steps=-1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "trainer.max_steps must be a positive" in bad.stderr
    after = _snapshot(run_dir)
    after.pop("train.log", None), before.pop("train.log", None)  # Hydra's log may gain a line
    assert after == before

    # a fresh command with a config error leaves no directory behind
    fresh = subprocess.run(
        [*cmd[:-1], "run_name=never", "data.seq_len=4096"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert fresh.returncode == 1 and "data.seq_len=4096" in fresh.stderr
    assert not list((tmp_path / "outputs").rglob("never"))


def test_a_second_process_in_a_run_dir_is_refused_and_a_killed_holder_blocks_nothing(
    finished_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = _copy(finished_run, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from picomaml.runs import RunLock; "
         f"RunLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = compose_train([*FAST, *STEPS[1:], "trainer.max_steps=6"], run_dir, cache_dir)
        before = _snapshot(run_dir)
        with pytest.raises(ConfigError, match=rf"is in use by pid {holder.pid} on host \S+ \(since "):
            train(cfg)
        assert _snapshot(run_dir) == before  # the refused process wrote nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, as after an OOM kill or a preemption
        holder.wait()
    result = train(compose_train([*FAST, *STEPS[1:], "trainer.max_steps=6"], run_dir, cache_dir))
    assert (result["status"], result["global_step"]) == ("completed", 6)


def test_damaged_metrics_rows_never_block_a_resume(
    finished_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    from picomaml.eval.analysis import read_metrics

    run_dir = _copy(finished_run, tmp_path / "run")
    metrics = run_dir / "csv" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    width = lines[0].count(",")
    # what two writers interleaving in one file left behind: a row with an empty step, a shifted row
    damaged = [*lines, "," * width, "1," + ",".join(["0.5"] * (width + 3))]
    metrics.write_text("\n".join(damaged) + "\n")
    assert [step for step, _ in read_metrics(run_dir)["val/loss"]] == [2, 4]  # readable, damage dropped
    result = train(compose_train([*FAST, *STEPS[1:], "trainer.max_steps=6"], run_dir, cache_dir))
    assert (result["status"], result["global_step"]) == ("completed", 6)
    rows = metrics.read_text().splitlines()
    assert all(row.split(",")[lines[0].split(",").index("step")] for row in rows[1:])


def test_divergence_stops_the_run_without_saving_nonfinite_weights(tmp_path: Path, cache_dir: Path) -> None:
    from picomaml.lit.module import DivergenceError

    overrides = [*FAST, *STEPS[1:], "trainer.max_steps=8", "optim.lr=1e6", "optim.warmup_steps=0"]
    with pytest.raises(DivergenceError, match=r"diverged at step \d+: non-finite") as err:
        train(compose_train(overrides, tmp_path, cache_dir))
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["status"], result["diverged_at_step"]) == ("diverged", err.value.step)
    assert err.value.step < 8
    for ckpt in (tmp_path / "checkpoints").rglob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), ckpt


def test_nonfinite_patience_skips_isolated_bad_steps(tmp_path: Path, cache_dir: Path) -> None:
    from picomaml.lit.module import PicoLitModule

    plan = prepare_run(
        compose_train([*FAST, "trainer.max_steps=4", "optim.nonfinite_patience=1"], tmp_path, cache_dir)
    )
    module: PicoLitModule = plan.module
    original = PicoLitModule.training_step
    calls = {"n": 0}

    def poisoned(self, batch, batch_idx):  # the second micro-batch's loss is NaN
        calls["n"] += 1
        if calls["n"] == 2:
            self._loss_nonfinite = torch.ones((), dtype=torch.bool)
        return original(self, batch, batch_idx)

    module.training_step = poisoned.__get__(module)
    plan.trainer.fit(module, datamodule=plan.datamodule)
    assert plan.trainer.global_step == 4 and calls["n"] == 5  # one batch skipped, four updates
    assert all(torch.isfinite(p).all() for p in module.parameters())
