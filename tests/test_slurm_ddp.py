"""Data parallel as one SLURM job on the local cluster: `hydra.launcher.tasks_per_node=2` runs the training
in 2 SLURM tasks, each one DDP rank (gloo on CPU), through the launcher profiles' own keys
(`hydra/launcher=slurm_local`, the CPU profile of `slurm`).

* a 2-task job trains with world size 2: both ranks join (their own submitit logs), rank 0 alone writes
  the run dir, the tokens count both ranks' batches, and rank 0's result is the job's;
* a trainer whose shape is not the job's (`trainer.devices=1` in a 2-task job) is refused before
  training, naming both keys;
* a 2-task hybrid (AR + SMLMT) job interrupted twice mid-run, first by submitit's requeue signal sent to
  rank 1 alone, then by `scontrol requeue`, is requeued once per interruption, resumes both ranks from
  last.ckpt, and logs the same metrics.csv history as the same job run without interruption.

The local cluster has one node of 2 CPUs: each job asks for 2 tasks of 1 CPU, so jobs run one at a time,
and a job may wait in the queue behind other users' jobs (QUEUE_S) before it starts.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from tests.helpers import job_state, wait_for
from tests.test_slurm_training import _env, _result, _rows, _run

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]
# how long a job may wait for the node (a job of 2 tasks needs both CPUs free), on top of its run time
QUEUE_S = 600

# the CPU profile sized from this cluster (1 CPU per task, no GPU), as 1 node x 2 tasks
SLURM = ["hydra/launcher=slurm_local", "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2"]
# one rank per task: the trainer's shape is the job's; DDP with gloo on CPU
DDP = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.num_nodes=1",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
TINY = [
    "model=tiny",
    "data=synthetic",
    "data.seq_len=32",
    "data.batch_size=4",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
]
# hybrid AR + SMLMT on the embedded wiki with a short word buffer (the word index builds in under a second)
META = [
    "data=wiki",
    "meta=5way4shot",
    "meta.hybrid_ratio=0.5",
    "meta.buffer_tokens=200000",
    "meta.window_len=32",
    "meta.val_episodes=2",
]


class Pace(pl.Callback):
    """Sleeps after every training batch, so that a tiny job outlives SLURM's KillWait (10 s) after
    SIGTERM however fast the machine is. Added with ``+callbacks.pace._target_=tests.test_slurm_ddp.Pace``.
    """

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        time.sleep(self.sleep_s)


def _train(*overrides: str) -> list[str]:
    # a key given in `overrides` replaces TINY's and DDP's (e.g. data=wiki, trainer.devices=1)
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    defaults = [o for o in (*TINY, *DDP) if o.split("=", 1)[0] not in given]
    return [sys.executable, "-m", "picomaml.train", "-m", *defaults, *SLURM, *overrides]


def _task_log(sweep_dir: Path, job_id: str, rank: int) -> str:
    """What rank `rank` of SLURM job `job_id` wrote to its own submitit logs (stdout and stderr; a
    requeued job appends to the same files)."""
    folder = sweep_dir / ".submitit" / job_id
    return "".join((folder / f"{job_id}_{rank}_log.{ext}").read_text() for ext in ("out", "err"))


def _job_ids(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir())


def test_two_task_job_trains_as_two_ranks(tmp_path: Path, cache_dir: Path) -> None:
    """One SLURM job of 2 tasks is one DDP run of world size 2: 6 AR steps of 4 x 32 tokens per rank."""
    sweep_dir = tmp_path / "ddp"
    start = time.time()
    proc = _run(
        _train("trainer.max_steps=6", "trainer.val_check_interval=3", f"hydra.sweep.dir={sweep_dir}"),
        cache_dir,
        timeout=QUEUE_S + 300,
    )
    wall = time.time() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    (job_id,) = _job_ids(sweep_dir)
    job_dir = sweep_dir / "0"
    result = _result(job_dir)
    assert result["status"] == "completed" and result["global_step"] == 6
    assert result["world_size"] == 2
    # both ranks' batches count: 6 steps x 2 ranks x 4 rows x 32 tokens
    assert result["tokens_seen"] == 6 * 2 * 4 * 32
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in _task_log(sweep_dir, job_id, rank)
    # rank 0 owns the run dir: its log holds one job's completion, not one per rank
    assert (job_dir / "train.log").read_text().count("Job completed successfully") == 1
    assert (job_dir / "training_config.yaml").is_file() and (job_dir / ".hydra" / "config.yaml").is_file()
    # what submitit hands back to Hydra is rank 0's return value: the run's metric
    with open(sweep_dir / ".submitit" / job_id / f"{job_id}_0_result.pkl", "rb") as file:
        outcome, job_return = pickle.load(file)
    assert outcome == "success" and job_return.return_value == pytest.approx(result["metric"])
    print(f"2-task DDP job: {result['wall_time_s']:.1f}s in the job, {wall:.1f}s from the driver's start")


def test_trainer_shape_must_match_the_job(tmp_path: Path, cache_dir: Path) -> None:
    """`trainer.devices=1` in a job of 2 tasks per node: refused before training, naming both keys."""
    sweep_dir = tmp_path / "mismatch"
    proc = _run(
        _train("trainer.devices=1", "trainer.max_steps=2", f"hydra.sweep.dir={sweep_dir}"),
        cache_dir,
        QUEUE_S + 300,
    )
    assert proc.returncode != 0
    assert "trainer.devices=1 but this SLURM job runs 2 task(s) per node" in proc.stderr, proc.stderr[-3000:]
    assert "hydra.launcher.tasks_per_node=2" in proc.stderr
    result = _result(sweep_dir / "0")
    assert result["status"] == "failed" and "global_step" not in result


def _saved_steps(job_dir: Path) -> list[int]:
    """Steps at which PreemptionCheckpoint saved last.ckpt after a signal, from rank 0's log."""
    lines = (job_dir / "train.log").read_text().splitlines()
    return [int(line.split(" at step ")[1].split()[0]) for line in lines if "after a signal" in line]


def _last_step(job_dir: Path) -> int:
    return max((step for step, _ in _rows(job_dir, "train/lr")), default=0)


def _rank_pid(job_id: str, rank: int) -> int:
    """The pid of rank `rank` of a running SLURM job on this node (the submitit process SLURM started)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" not in cmdline:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} of job {job_id} runs on this node")


def _slurm_job_id(array_task: str) -> str:
    """The plain job id of array task `<array>_<i>` (what the job's processes see as SLURM_JOB_ID)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", array_task], capture_output=True, text=True).stdout
    return re.search(r"\bJobId=(\d+)", out).group(1)


def _restarts(array_task: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", "-o", array_task], capture_output=True, text=True).stdout
    return int(re.search(r"\bRestarts=(\d+)", out).group(1))


def _interrupt(job_id: str, interrupt: Any) -> None:
    """Interrupts the running job, which must then be requeued; releases it at once (SLURM holds a
    requeued job for ~120 s, BeginTime)."""
    interrupt()
    wait_for(lambda: job_state(job_id) == "PENDING", 90, f"job {job_id} to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def test_requeued_ddp_job_resumes_to_the_uninterrupted_history(tmp_path: Path, cache_dir: Path) -> None:
    """Two 2-task hybrid jobs in one array that train identically (the second sleeps 0.2 s after each
    step, see Pace); the second is interrupted twice and logs the same history as the first.

    1. After step 4, submitit's requeue signal (USR2) to rank 1 alone, which cannot requeue: every rank
       saves last.ckpt at the next logging step, rank 0 requeues the job through submitit and exits,
       rank 1 exits instead of waiting for rank 0 in the next collective.
    2. A few steps into the rerun, `scontrol requeue` (what preemption does): SIGTERM to both ranks,
       which save last.ckpt at the next logging step and train on until SLURM kills them (KillWait).
    Each interruption is one requeue (SLURM's restart count is 2); both reruns resume from the signal
    saves (routine step checkpoints only at steps 0 and 80).
    """
    sweep_dir = tmp_path / "requeue"
    cmd = _train(
        *META,
        "trainer.max_steps=80",
        "trainer.val_check_interval=40",
        "trainer.log_every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=100",
        "callbacks.model_checkpoint.log_spaced_until=0",
        "++logger.csv.flush_logs_every_n_steps=1",
        "+callbacks.pace._target_=tests.test_slurm_ddp.Pace",
        "+callbacks.pace.sleep_s=0,0.2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    start = time.time()
    driver = subprocess.Popen(
        cmd, cwd=REPO, env=_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    job_dir = sweep_dir / "1"
    try:
        wait_for(lambda: _last_step(job_dir) >= 4, 2 * QUEUE_S, "step 4 of the interrupted job")
        (array_task,) = (p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.endswith("_1"))
        rank1 = _rank_pid(_slurm_job_id(array_task), 1)
        _interrupt(array_task, lambda: os.kill(rank1, signal.SIGUSR2))  # submitit's requeue signal
        # the first run stopped right after its save: later steps can only come from the rerun
        (first_save,) = _saved_steps(job_dir)
        wait_for(lambda: _last_step(job_dir) >= first_save + 4, QUEUE_S, "the rerun to train")
        _interrupt(array_task, lambda: subprocess.run(["scontrol", "requeue", array_task], check=True))
        output, _ = driver.communicate(timeout=QUEUE_S + 300)
    finally:
        driver.kill()
    wall = time.time() - start
    assert driver.returncode == 0, output[-4000:]

    log = (job_dir / "train.log").read_text()
    saves = _saved_steps(job_dir)
    assert len(saves) == 2 and log.count("resuming from") == 2, log[-3000:]
    assert _restarts(array_task) == 2  # one requeue per interruption, none from a second rank
    assert "rank 1 stops after the save" in _task_log(sweep_dir, array_task, 1)
    assert log.count("Job completed successfully") == 1, "the job finished within SLURM's KillWait"
    straight, interrupted = _result(sweep_dir / "0"), _result(job_dir)
    assert straight["status"] == interrupted["status"] == "completed"
    assert straight["world_size"] == interrupted["world_size"] == 2
    assert straight["global_step"] == interrupted["global_step"] == 80
    assert straight["tokens_seen"] == interrupted["tokens_seen"]
    # the hybrid schedule is the same coin on both ranks and after each resume: both kinds of steps ran
    meta_steps = _rows(job_dir, "meta/meta_steps")
    assert meta_steps == _rows(sweep_dir / "0", "meta/meta_steps") and 0 < meta_steps[-1][1] < 80
    for key in ("train/loss_ar", "train/loss_meta", "train/grad_norm", "val/loss", "meta_test/query_acc"):
        a, b = _rows(sweep_dir / "0", key), _rows(job_dir, key)
        assert a and [s for s, _ in a] == [s for s, _ in b], key  # the same steps, none twice or missing
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) <= 1e-6, key
    steps = [s for s, _ in _rows(job_dir, "train/lr")]
    assert steps == list(range(2, 81, 2))
    print(
        f"2-task DDP requeue test: last.ckpt saved at steps {saves} (USR2 to rank 1, SIGTERM), resumed twice "
        f"to step 80; uninterrupted job {straight['wall_time_s']:.1f}s, interrupted job's last run "
        f"{interrupted['wall_time_s']:.1f}s, whole test {wall:.1f}s"
    )
