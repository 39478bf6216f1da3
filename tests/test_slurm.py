"""picomaml's optuna sweeper on a real (local, single-node) SLURM cluster, and the kit's requeue path.

The cluster comes from launchers/slurm_local_cluster.sh: used as is when its controller answers
(``scontrol ping``), otherwise started here (root and apt-get needed, else the tests skip) and stopped
at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import job_state, wait_for

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "sweep_app" / "app.py"
KIT = REPO / "launchers" / "slurm_local_cluster.sh"

pytestmark = pytest.mark.slow


def test_optuna_sweep_on_slurm(slurm_cluster: None, tmp_path: Path) -> None:
    """5 trials, 2 at a time as SLURM jobs: trial 0 raises, trial 1 is slow and gets scancel'ed."""
    sweep_dir = tmp_path / "slurm_sweep"
    cmd = [
        sys.executable,
        str(APP),
        "-m",
        f"hydra.searchpath=[file://{REPO / 'conf'}]",
        "hydra/sweeper=picomaml_optuna",
        "hydra/launcher=slurm_local",
        f"hydra.sweep.dir={sweep_dir}",
        "x=interval(0,0.8)",
        "y=interval(0,0.9)",
        "fail_above=0.85",
        "slow_trial=1",
        "slow_step_sleep=30",
        "hydra.sweeper.enqueue=[{x:0.9,y:0.5}]",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.plots=false",
    ]
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        slow_timing = sweep_dir / "1" / "timing.json"
        wait_for(slow_timing.exists, 90, "the slow trial to start")
        job_id = json.loads(slow_timing.read_text())["slurm_job_id"]
        assert job_id
        # other trials must start and finish while the slow one holds its slot
        wait_for(lambda: (sweep_dir / "3" / "result.json").exists(), 90, "trial 3 to finish")
        assert job_state(job_id) == "RUNNING"
        subprocess.run(["scancel", job_id], check=True)
        output, _ = driver.communicate(timeout=150)
    finally:
        driver.kill()
    assert driver.returncode == 0, output[-4000:]

    study = optuna.load_study(study_name="picomaml", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    trials = study.trials
    assert len(trials) == 5
    assert trials[0].state == TrialState.FAIL and "fail_above" in trials[0].user_attrs["error"]
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["error"].startswith("job died")
    assert [t.state for t in trials[2:]] == [TrialState.COMPLETE] * 3
    assert all(len(t.intermediate_values) == 5 for t in trials[2:])
    for t in trials:
        tm = json.loads((sweep_dir / str(t.number) / "timing.json").read_text())
        if "end" in tm:
            start = tm["start"] - t.user_attrs["submitted_at"]
            recorded = t.datetime_complete.timestamp() - tm["end"]
            print(
                f"slurm trial {t.number}: submission -> start {start:.2f}s, end -> recorded {recorded:.2f}s"
            )


def test_requeue_reruns_a_job(slurm_cluster: None, tmp_path: Path) -> None:
    """What preemption does to a job: `scontrol requeue`, then the job runs again in the same place."""
    log = tmp_path / "runs.log"
    script = f"echo run ${{SLURM_RESTART_COUNT:-0}} >> {log}; sleep 60"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--requeue", "-c", "1", "-o", str(tmp_path / "%j.out"), "--wrap", script],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        wait_for(lambda: log.exists() and "run 0" in log.read_text(), 60, "the first run")
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        # SLURM holds a requeued job for ~120 s (BeginTime); release it now
        wait_for(lambda: job_state(job_id) == "PENDING", 30, "the job to be requeued")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        wait_for(lambda: "run 1" in log.read_text(), 60, "the second run")
    finally:
        subprocess.run(["scancel", job_id])
    assert log.read_text().split("\n")[:2] == ["run 0", "run 1"]
