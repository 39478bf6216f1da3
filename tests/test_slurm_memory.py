"""A trial that goes over its SLURM memory request is killed by SLURM and recorded `oom`, alone, while
another trial of the same study completes (issue 12), on the local SLURM cluster.

The kit (launchers/slurm_local_cluster.sh) runs without cgroups and turns on
`JobAcctGatherParams=OverMemoryKill`: slurmstepd polls the job's resident memory (every 30 s) and kills
a step over the job's --mem. Both trials ask for 1 GB: tiny trains in ~0.7 GB, 65m holds weights, grads
and AdamW state of 0.26 + 0.26 + 0.52 GB on top of the runtime and is killed at the next poll. Neither is
over the sweep's memory budget (none is set): the kill happens at run time, as on a real cluster when
the request is too small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import FAST

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def _enforces_memory() -> bool:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    return "OverMemoryKill" in config or "task/cgroup" in config


def test_trial_over_its_slurm_memory_is_oom_and_the_study_goes_on(tmp_path: Path, cache_dir: Path) -> None:
    if not _enforces_memory():
        pytest.skip("this SLURM cluster does not enforce --mem (no OverMemoryKill, no task/cgroup)")
    sweep_dir = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("model=")]
    cmd = [
        sys.executable,
        "-m",
        "picomaml.train",
        "-m",
        *fast,
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10",
        "hydra/sweeper=picomaml_optuna",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.plots=false",
        "model=choice(tiny,65m)",
        # long enough (40 steps, >= 1 s each) that 65m is still running at slurmstepd's next poll
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "data.val_batches=1",
        "callbacks=none",
        "+callbacks.pace._target_=tests.test_slurm_training.Pace",
        "+callbacks.pace.sleep_s=1.0",
    ]
    env = {"PICOMAML_CACHE": str(cache_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env = {**os.environ, **env}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    study = optuna.load_study(study_name="picomaml", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    trials = {t.params["model"]: t for t in study.trials}
    killed, ok = trials["65m"], trials["tiny"]
    assert killed.user_attrs["status"] == "oom", killed.user_attrs.get("error")
    assert "memory limit" in killed.user_attrs["error"]  # slurmstepd's words, quoted by submitit
    assert killed.constraints["oom"] > 0 and killed.state == TrialState.PRUNED
    assert ok.state == TrialState.COMPLETE and ok.value is not None
    trials_csv = (sweep_dir / "trials.csv").read_text()
    assert ",oom" in trials_csv and ",complete" in trials_csv
