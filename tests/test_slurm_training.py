"""`python -m picomaml.train` itself on the local SLURM cluster: a grid sweep as one job array, a training
job interrupted twice (submitit's USR2, `scontrol requeue`) that ends as if never interrupted, and an
optuna study of real trainings (8 trials, 2 at a time) that fails one trial alone, prunes a bad region,
runs other trials while a slow one holds its slot, and resumes to 10 trials. Prints the per-trial
overheads (submission -> first step, last step -> result recorded).

The cluster fixture is tests/conftest.py's (starts launchers/slurm_local_cluster.sh when no controller
answers). Jobs ask for 1 CPU and run one thread each.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import pytest
from optuna.trial import TrialState

from picomaml.sweep.clock import read_clock
from picomaml.sweep.results import SUBMITTED_ATTR
from tests.helpers import job_state, wait_for

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

# the profile for this cluster: 1 CPU per job, memory from sinfo (mem_gb: auto), no GPU
SLURM = ["hydra/launcher=slurm_local"]
# the embedded wiki with a short word buffer: the SMLMT word index builds in well under a second
META = [
    "data=wiki",
    "meta=5way4shot",
    "meta.buffer_tokens=200000",
    "meta.window_len=32",
    "meta.val_episodes=2",
]
# few steps; one validation batch
SHORT = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "data.val_batches=1",
]


class Pace(pl.Callback):
    """Sleeps after every training batch, so that a tiny job outlives SLURM's KillWait (10 s) after
    SIGTERM however fast the machine is (at 7 steps/s it would finish 70 steps before the kill).

    Added with ``+callbacks.pace._target_=tests.test_slurm_training.Pace +callbacks.pace.sleep_s=...``.
    """

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        time.sleep(self.sleep_s)


def _env(cache_dir: Path) -> dict[str, str]:
    # sbatch exports the driver's environment to the jobs
    return {**os.environ, "PICOMAML_CACHE": str(cache_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _train_cmd(*overrides: str) -> list[str]:
    # imported here, not at the top: the trials import this module for Pace, and importing
    # conftest sets torch's thread count in the importing process
    from tests.helpers import FAST

    # a key given in `overrides` replaces FAST's (e.g. a search space for optim.lr)
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides} | {"model"}
    fast = [o for o in FAST if o.split("=", 1)[0] not in given]
    return [sys.executable, "-m", "picomaml.train", "-m", "model=tiny", *fast, *SLURM, *overrides]


def _run(cmd: list[str], cache_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=_env(cache_dir), capture_output=True, text=True, timeout=timeout)


def _result(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / "result.json").read_text())


def _rows(job_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics.csv row that has `key`, in file order; [] before the first write."""
    path = job_dir / "csv" / "metrics.csv"
    if not path.exists():
        return []
    with open(path) as file:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(file) if r.get(key)]


def _array_ids(sweep_dir: Path) -> set[str]:
    # submitit keeps one folder per array task: <array job id>_<task id>
    tasks = (p.name.split("_") for p in (sweep_dir / ".submitit").iterdir())
    return {t[0] for t in tasks if len(t) == 2 and t[0].isdigit() and t[1].isdigit()}


def test_grid_sweep_is_one_job_array(tmp_path: Path, cache_dir: Path) -> None:
    """A 2 x 2 grid of hybrid AR + meta runs: one SLURM array of 4 tasks, all finished in the report."""
    sweep_dir = tmp_path / "grid"
    cmd = _train_cmd(
        *META,
        *SHORT,
        "model.n_layers=1,2",
        "meta.hybrid_ratio=0,0.5",
        "seed=3",
        f"hydra.sweep.dir={sweep_dir}",
    )
    proc = _run(cmd, cache_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (array_id,) = _array_ids(sweep_dir)
    sacct = ["sacct", "-n", "-X", "-j", array_id, "-o", "JobID%30,State"]

    def tasks() -> list[list[str]]:
        out = subprocess.run(sacct, capture_output=True, text=True).stdout
        return sorted(line.split() for line in out.splitlines())

    # the driver goes by submitit's result files; accounting can lag a few seconds behind them
    expected = [[f"{array_id}_{i}", "COMPLETED"] for i in range(4)]
    wait_for(lambda: tasks() == expected, 30, f"sacct to show {expected}")
    for i in range(4):
        assert _result(sweep_dir / str(i))["status"] == "completed"
        assert _result(sweep_dir / str(i))["global_step"] == 4

    report = _run([sys.executable, "-m", "picomaml.report", f"sweep_dir={sweep_dir}"], cache_dir, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    with open(sweep_dir / "report.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["job"], r["status"]) for r in rows] == [(str(i), "completed") for i in range(4)]
    grid = {(r["model.n_layers"], r["meta.hybrid_ratio"]) for r in rows}
    assert grid == {(n, r) for n in ("1", "2") for r in ("0", "0.5")}


def _last_step(job_dir: Path) -> int:
    return max((step for step, _ in _rows(job_dir, "train/loss_ar")), default=0)


def _saved_steps(job_dir: Path) -> list[int]:
    """Steps at which PreemptionCheckpoint saved last.ckpt after a signal, from the job's log."""
    lines = (job_dir / "train.log").read_text().splitlines()
    return [int(line.split(" at step ")[1].split()[0]) for line in lines if "after a signal" in line]


def _interrupt(job_id: str, command: list[str]) -> None:
    """Runs `command` against the running job, which must then be requeued; releases it at once
    (SLURM holds a requeued job for ~120 s, BeginTime)."""
    subprocess.run(command, check=True)
    wait_for(lambda: job_state(job_id) == "PENDING", 60, f"job {job_id} to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def test_interrupted_job_resumes_to_the_uninterrupted_result(tmp_path: Path, cache_dir: Path) -> None:
    """Two jobs in one array that train identically (the second only sleeps 0.2 s after each step, see
    Pace); the second is interrupted twice and ends as the first does.

    1. After step 4, submitit's signal (USR2, as before a time limit or on preemption): last.ckpt at
       the next logging step, then submitit requeues the job itself and exits.
    2. A few steps into the rerun, `scontrol requeue` (what preemption does): SIGTERM must not end
       `fit`; the job saves last.ckpt at the next logging step and trains on until SLURM kills it
       (KillWait, 10 s later; the ~70 steps left take at least 14 s).
    The routine step checkpoints are at steps 0 and 80 only (no log-spaced ones, cadence 100), so both
    resumes start from the signal saves. metrics.csv is written at every logging step so that the
    test sees the job's progress.
    """
    sweep_dir = tmp_path / "requeue"
    cmd = _train_cmd(
        "trainer.max_steps=80",
        "trainer.val_check_interval=40",
        "trainer.log_every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=100",
        "callbacks.model_checkpoint.log_spaced_until=0",
        "++logger.csv.flush_logs_every_n_steps=1",
        "+callbacks.pace._target_=tests.test_slurm_training.Pace",
        "+callbacks.pace.sleep_s=0,0.2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    driver = subprocess.Popen(
        cmd, cwd=REPO, env=_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    job_dir = sweep_dir / "1"
    try:
        wait_for(lambda: _last_step(job_dir) >= 4, 120, "step 4 of the job")
        (job_id,) = (p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.endswith("_1"))
        _interrupt(job_id, ["scancel", "--signal=USR2", job_id])
        # the first run stopped right after its save: later steps can only come from the rerun
        (first_save,) = _saved_steps(job_dir)
        wait_for(lambda: _last_step(job_dir) >= first_save + 4, 120, "the rerun to train")
        _interrupt(job_id, ["scontrol", "requeue", job_id])
        output, _ = driver.communicate(timeout=240)
    finally:
        driver.kill()
    assert driver.returncode == 0, output[-4000:]

    log = (job_dir / "train.log").read_text()
    saves = _saved_steps(job_dir)
    assert len(saves) == 2 and log.count("resuming from") == 2, log[-3000:]
    # only the last run ended by itself: the one after SIGTERM was killed mid-run, as intended
    assert log.count("Job completed successfully") == 1, "the job finished within SLURM's KillWait"
    straight, interrupted = _result(sweep_dir / "0"), _result(job_dir)
    assert straight["status"] == interrupted["status"] == "completed"
    assert straight["global_step"] == interrupted["global_step"] == 80
    assert straight["tokens_seen"] == interrupted["tokens_seen"]
    for key in ("train/loss_ar", "val/loss"):
        a, b = _rows(sweep_dir / "0", key), _rows(job_dir, key)
        assert [s for s, _ in a] == [s for s, _ in b], key  # the same steps, none twice
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) <= 1e-6, key
    print(f"interrupted job: last.ckpt saved at steps {saves} (USR2, SIGTERM), resumed twice to step 80")


def _overheads(study: optuna.Study, sweep_dir: Path) -> list[tuple[int, float, float]]:
    """(trial, submission -> first step, last step -> recorded) of every completed trial, printed with
    the process start in between."""
    rows = []
    for t in study.trials:
        clock = read_clock(sweep_dir / str(t.number))
        if t.state == TrialState.COMPLETE and clock is not None:
            submitted = t.user_attrs[SUBMITTED_ATTR]
            start = clock["first_step"] - submitted
            recorded = t.datetime_complete.timestamp() - clock["last_step"]
            rows.append((t.number, start, recorded))
            print(
                f"trial {t.number}: submission -> first step {start:.1f}s "
                f"(-> process start {clock['process_start'] - submitted:.1f}s), "
                f"last step -> recorded {recorded:.1f}s"
            )
    return rows


# every trial of the first run, enqueued so that the outcome does not depend on timing. With
# hybrid_ratio 0 the meta params do not touch the backbone, so trials 0, 1, 3 and 4 train identically
# (their val/loss ties, and the median pruner only prunes a trial strictly worse than the median);
# 2 fails in training (hybrid_ratio must be in [0, 1]); 5 and 6 have an lr 300x the good one, and
# their val/loss at the first validation (step 2) is far worse (18.1 vs 10.8): the median pruner
# (n_startup_trials=2) stops them there, when 3+ good trials have completed (a trial starts only after
# all but one of the trials before it ended); 7 ties with the good ones again (a hybrid trial's
# val/loss after 2 steps, one of which may be a meta step, sits on either side of the median depending
# on the data and the coin, which made its state a matter of luck; the grid test trains hybrid runs).
GOOD = {"optim.lr": 3e-3, "meta.hybrid_ratio": 0.0, "meta.inner_steps": 2}
ENQUEUE = [
    {**GOOD, "meta.inner_lr": 0.1},
    {**GOOD, "meta.inner_lr": 0.2},
    {**GOOD, "meta.inner_lr": 0.3, "meta.hybrid_ratio": 1.5},
    {**GOOD, "meta.inner_lr": 0.4},
    {**GOOD, "meta.inner_lr": 0.5},
    {**GOOD, "meta.inner_lr": 0.1, "optim.lr": 1.0},
    {**GOOD, "meta.inner_lr": 0.2, "optim.lr": 1.0},
    {**GOOD, "meta.inner_lr": 0.6},
]
SLOW_STEP_S = 15.0


def _enqueue_override() -> str:
    items = ("{" + ",".join(f"{k}:{v}" for k, v in params.items()) + "}" for params in ENQUEUE)
    return "hydra.sweeper.enqueue=[" + ",".join(items) + "]"


def test_optuna_study_of_real_trainings(tmp_path: Path, cache_dir: Path) -> None:
    """8 trials, 2 at a time as SLURM jobs (see ENQUEUE): trial 2 fails alone, 5 and 6 are pruned,
    trial 0 sleeps SLOW_STEP_S after each of its 4 steps while trials after it start and finish.
    A rerun with n_trials=10 runs trials 8 and 9 only and leaves the dirs of 0-7 byte for byte."""
    sweep_dir = tmp_path / "optuna"

    def sweep(n_trials: int) -> None:
        cmd = _train_cmd(
            "hparams_search=meta_optuna",
            "optim.lr=tag(log, interval(1e-4, 3e-3))",
            *META,
            *SHORT,
            "+callbacks.trial_clock._target_=picomaml.bench.sweep.TrialClock",
            "+callbacks.trial_clock.trial=${sweep.trial_number}",
            "+callbacks.trial_clock.slow_trials=[0]",
            f"+callbacks.trial_clock.slow_step_s={SLOW_STEP_S}",
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.parallelism=2",
            "hydra.sweeper.plots=false",
            "hydra.sweeper.pruner.name=median",
            "hydra.sweeper.pruner.n_startup_trials=2",
            "hydra.sweeper.pruner.n_warmup_steps=0",
            _enqueue_override(),
        )
        proc = _run(cmd, cache_dir, timeout=360)
        assert proc.returncode == 0, proc.stderr[-4000:]

    def load() -> optuna.Study:
        return optuna.load_study(study_name="meta_optuna", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")

    sweep(8)
    trials = load().trials
    ok, failed, pruned = TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED
    states = [ok, ok, failed, ok, ok, pruned, pruned, ok]
    assert [t.state for t in trials] == states, [(t.number, t.state, t.intermediate_values) for t in trials]
    assert [t.params for t in trials] == ENQUEUE
    assert "hybrid_ratio" in _result(sweep_dir / "2")["error"]
    assert "hybrid_ratio" in trials[2].user_attrs["error"]
    # validations at steps 2 and 4; the pruned ones stopped at the first
    assert all(sorted(trials[n].intermediate_values) == [2, 4] for n in (0, 1, 3, 4, 7))
    assert all(sorted(trials[n].intermediate_values) == [2] for n in (5, 6))
    assert trials[5].intermediate_values[2] > 1.5 * trials[1].intermediate_values[2]
    assert _result(sweep_dir / "5")["status"] == "pruned"

    # asynchrony: trials that started after the slow trial's first step and ended before its last
    slow = read_clock(sweep_dir / "0")
    assert slow is not None and slow["steps"] == 4
    assert slow["last_step"] - slow["first_step"] >= 3 * SLOW_STEP_S
    clocks = {n: read_clock(sweep_dir / str(n)) for n in range(1, 8)}
    inside = [
        n
        for n, c in clocks.items()
        if c is not None
        and c["last_step"] is not None
        and slow["first_step"] < c["process_start"]
        and c["last_step"] < slow["last_step"]
    ]
    assert len(inside) >= 2, f"trials that ran while trial 0 did: {inside}"
    print(f"trials {inside} started and finished while slow trial 0 trained")
    before = {p: p.read_bytes() for n in range(8) for p in (sweep_dir / str(n)).rglob("*") if p.is_file()}

    sweep(10)
    trials = load().trials
    assert len(trials) == 10
    assert [t.state for t in trials[:8]] == states
    assert all(t.state.is_finished() for t in trials[8:])
    assert sorted(int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()) == list(range(10))
    after = {p for n in range(8) for p in (sweep_dir / str(n)).rglob("*") if p.is_file()}
    assert after == set(before)
    assert {p: p.read_bytes() for p in before} == before
    assert len(_overheads(load(), sweep_dir)) >= 5
