"""``python -m picomaml.bench sweep``: what picomaml's optuna sweeper costs per trial, and what its
asynchronous schedule gains over hydra-optuna-sweeper's blocking batches.

The same study (``trials`` trials, ``parallelism`` at a time, random sampler with a fixed seed, no
pruner) runs twice through the chosen launcher: ``hydra.sweeper.schedule=async`` (a new trial as soon as
one ends) and ``schedule=batch`` (``parallelism`` trials per launch call, i.e. one SLURM job array per
batch, all awaited before the next batch). One trial of every batch is slow (trials 0, p, 2p, ...
sleep ``slow_step_s`` more per step), so a batch lasts as long as its slow trial while async keeps the
other slot busy. Trials are either the sweep test app (``task=app``: ``tests/sweep_app/app.py``, a
Hydra task that sleeps ``step_s`` per step) or real trainings (``task=train``: ``python -m
picomaml.train`` with the tiny model on the embedded wiki with SMLMT episodes, hparams_search=meta_optuna,
``steps`` optimizer steps; the slow trials are made slow by ``TrialClock`` below)::

    python -m picomaml.bench sweep launcher=slurm task=train out=bench_sweep.json

Per trial, from the study (``submitted_at`` attribute, completion time) and the trial's
``step_clock.json`` (``picomaml.sweep.clock``):

* ``submit_to_process``: launch call to the start of the trial's process (sbatch, scheduling, the
  job's shell and srun; for submitit_local, the fork/exec),
* ``process_to_first_step``: process start to the first training step (Python start-up and imports,
  unpickling, Hydra composition, data and model setup),
* ``submit_to_first_step``: their sum, the issue's "submission to the first training step",
* ``last_step_to_recorded``: end of the last step to the result recorded in the study (the task's
  return, result pickle, the launcher noticing it, ``study.tell``). Under ``batch`` it includes the wait
  for the batch's slowest trial.

``python_startup_s`` is the median time of ``python -c "import <the task's modules>"`` measured in the
same run; ``submit_to_first_step_beyond_startup`` subtracts it. Wall times are of the whole driver
command (``wall_s``, with the driver's own start-up) and of the study (``study_s``: first submission to
last recorded result).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from picomaml.bench.common import parse_args
from picomaml.sweep.clock import StepClock, read_clock

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "tests" / "sweep_app" / "app.py"
SCHEDULES = ("async", "batch")
LAUNCHERS = ("submitit_local", "slurm")
TASKS = ("app", "train")
# what the trial processes import before their first step, for the Python start-up baseline
_LAUNCHER_MODULE = "hydra_plugins.hydra_submitit_launcher.submitit_launcher"
STARTUP_IMPORTS = {
    "app": f"import submitit, hydra, optuna, picomaml.sweep, {_LAUNCHER_MODULE}",
    "train": f"import submitit, picomaml.train, {_LAUNCHER_MODULE}",
}
# per trial: one CPU, no GPU, a short time limit (the local cluster has 2 CPUs)
SLURM_RESOURCES = [
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]
# tiny model on the embedded wiki, SMLMT episodes from a short word buffer, one validation at the end
TRAIN = [
    "hparams_search=meta_optuna",
    "model=tiny",
    "data=wiki",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.val_batches=1",
    "meta.buffer_tokens=200000",
    "meta.window_len=32",
    "meta.val_episodes=2",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2",
]


class TrialClock(pl.Callback):
    """Writes ``step_clock.json`` (``picomaml.sweep.clock.StepClock``) into the run dir, and makes the
    trials listed in ``slow_trials`` sleep ``slow_step_s`` after every training step.

    In a sweep, ``trial`` is the trial's number::

        +callbacks.trial_clock._target_=picomaml.bench.sweep.TrialClock
        '+callbacks.trial_clock.trial=${sweep.trial_number}' +callbacks.trial_clock.slow_trials=[0,2]
        +callbacks.trial_clock.slow_step_s=2.0
    """

    def __init__(self, trial: int | None = None, slow_trials: Any = (), slow_step_s: float = 0.0) -> None:
        self.slow = trial is not None and int(trial) in {int(t) for t in slow_trials or ()}
        self.slow_step_s = float(slow_step_s)
        self.clock: StepClock | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.clock = StepClock(trainer.default_root_dir)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        assert self.clock is not None
        self.clock.step_start()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        assert self.clock is not None
        if self.slow:
            time.sleep(self.slow_step_s)
        self.clock.step_end()


def _env() -> dict[str, str]:
    # sbatch exports the driver's environment to the jobs
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def python_startup_s(task: str, repeats: int = 3) -> float:
    """Median seconds of ``python -c "import ..."`` for the modules a trial imports (after one
    warm-up run that fills the page cache)."""
    cmd = [sys.executable, "-c", STARTUP_IMPORTS[task]]
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=_env(), cwd=REPO, capture_output=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_command(args: dict[str, Any], schedule: str, sweep_dir: Path) -> list[str]:
    """The driver command of one study: ``args`` as parsed by ``bench_sweep``."""
    slow = list(range(0, args["trials"], args["parallelism"]))
    slow_list = "[" + ",".join(map(str, slow)) + "]"
    sweeper = [
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra/launcher={args['launcher']}",
        f"hydra.sweeper.n_trials={args['trials']}",
        f"hydra.sweeper.parallelism={args['parallelism']}",
        f"hydra.sweeper.schedule={schedule}",
        "hydra.sweeper.sampler.name=random",
        f"hydra.sweeper.sampler.seed={args['seed']}",
        "hydra.sweeper.pruner.name=none",
        "hydra.sweeper.plots=false",
        *(SLURM_RESOURCES if args["launcher"] == "slurm" else []),
    ]
    if args["task"] == "app":
        return [
            sys.executable,
            str(APP),
            "-m",
            "hydra.searchpath=[pkg://picomaml.conf]",
            "hydra/sweeper=picomaml_optuna",
            *sweeper,
            "x=interval(0,1)",
            "y=interval(0,1)",
            f"steps={args['steps']}",
            f"step_sleep={args['step_s']}",
            f"slow_trial={slow_list}",
            f"slow_step_sleep={args['slow_step_s']}",
        ]
    return [
        sys.executable,
        "-m",
        "picomaml.train",
        "-m",
        *TRAIN,
        f"trainer.max_steps={args['steps']}",
        f"trainer.val_check_interval={args['steps']}",
        *sweeper,
        "+callbacks.trial_clock._target_=picomaml.bench.sweep.TrialClock",
        "+callbacks.trial_clock.trial=${sweep.trial_number}",
        f"+callbacks.trial_clock.slow_trials={slow_list}",
        f"+callbacks.trial_clock.slow_step_s={args['slow_step_s']}",
    ]


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def _submissions(sweep_dir: Path) -> int | None:
    """SLURM submissions (job arrays or single jobs) of a sweep, from submitit's job folders."""
    folder = sweep_dir / ".submitit"
    if not folder.exists():
        return None
    ids = {p.name.split("_")[0] for p in folder.iterdir() if p.name.split("_")[0].isdigit()}
    return len(ids)


def measure_study(
    sweep_dir: Path, study_name: str, slow: set[int], startup_s: float, slurm: bool = False
) -> dict[str, Any]:
    """Per-trial timings of one finished study, and their summary."""
    import optuna
    from optuna.trial import TrialState

    from picomaml.sweep.results import SUBMITTED_ATTR

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    trials = []
    for t in study.trials:
        clock = read_clock(sweep_dir / str(t.number)) or {}
        submitted = t.user_attrs.get(SUBMITTED_ATTR)
        recorded = t.datetime_complete.timestamp() if t.datetime_complete else None
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "slow": t.number in slow,
            "slurm_job_id": clock.get("slurm_job_id"),
            "submitted_at": submitted,
            "recorded_at": recorded,
            "steps": clock.get("steps"),
        }
        marks = [submitted, clock.get("process_start"), clock.get("first_step"), clock.get("last_step")]
        if all(m is not None for m in marks) and recorded is not None:
            sub, proc, first, last = marks
            row.update(
                submit_to_process=proc - sub,
                process_to_first_step=first - proc,
                submit_to_first_step=first - sub,
                submit_to_first_step_beyond_startup=first - sub - startup_s,
                last_step_to_recorded=recorded - last,
            )
        trials.append(row)
    timed = [r for r in trials if "submit_to_first_step" in r]
    keys = (
        "submit_to_process",
        "process_to_first_step",
        "submit_to_first_step",
        "submit_to_first_step_beyond_startup",
        "last_step_to_recorded",
    )
    submitted = [r["submitted_at"] for r in trials if r["submitted_at"] is not None]
    recorded = [r["recorded_at"] for r in trials if r["recorded_at"] is not None]
    return {
        "states": {s.name: sum(t.state == s for t in study.trials) for s in TrialState if s.is_finished()},
        "study_s": max(recorded) - min(submitted) if submitted and recorded else None,
        # trials of one launch call share their submission time
        "launch_calls": len(set(submitted)),
        "slurm_submissions": _submissions(sweep_dir) if slurm else None,
        "overheads": {k: _stats([r[k] for r in timed]) for k in keys},
        # under batch, a fast trial's result waits for its batch's slow one: fast and slow apart
        "last_step_to_recorded_fast": _stats([r["last_step_to_recorded"] for r in timed if not r["slow"]]),
        "trials": trials,
    }


def bench_sweep(argv: list[str]) -> dict[str, Any]:
    """Runs the study once per schedule; returns (prints, writes to ``out``) the measurements."""
    args = parse_args(
        argv,
        {
            "launcher": "submitit_local",
            "task": "app",
            "trials": 8,
            "parallelism": 2,
            "steps": 5,
            "step_s": 0.2,
            "slow_step_s": 2.0,
            "schedules": "async,batch",
            "seed": 0,
            "dir": None,
            "timeout_s": 1200.0,
            "out": None,
        },
        "picomaml.bench sweep",
        __doc__ or "",
    )
    schedules = [s for s in str(args["schedules"]).split(",") if s]
    for key, value, allowed in (
        ("launcher", args["launcher"], LAUNCHERS),
        ("task", args["task"], TASKS),
        *(("schedules", s, SCHEDULES) for s in schedules),
    ):
        if value not in allowed:
            raise SystemExit(f"{key}={value!r}; allowed values: {', '.join(allowed)}")
    if args["trials"] < 1 or args["parallelism"] < 1 or args["steps"] < 1:
        raise SystemExit("trials, parallelism and steps must be >= 1")
    root = Path(args["dir"] or f"outputs/bench/sweep/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"dir={root} is not empty: the studies must start from scratch")
    root.mkdir(parents=True, exist_ok=True)
    slow = set(range(0, args["trials"], args["parallelism"]))
    study_name = "picomaml" if args["task"] == "app" else "meta_optuna"
    startup = python_startup_s(args["task"])
    slurm = args["launcher"] == "slurm"
    result: dict[str, Any] = {
        **{
            k: args[k]
            for k in ("launcher", "task", "trials", "parallelism", "steps", "step_s", "slow_step_s")
        },
        "slow_trials": sorted(slow),
        "python_startup_s": startup,
        "dir": str(root),
        "cpus": os.cpu_count(),
    }
    if args["task"] == "train":
        # one step of a single run first: it fills the token and word-index caches that every trial
        # reads, outside the measurement
        run_dir = root / "warmup"
        cmd = [sys.executable, "-m", "picomaml.train", *TRAIN, "hydra.mode=RUN", f"hydra.run.dir={run_dir}"]
        cmd += ["trainer.max_steps=1", "trainer.val_check_interval=1"]
        proc = subprocess.run(
            cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=args["timeout_s"]
        )
        if proc.returncode != 0:
            raise SystemExit(f"the warm-up run failed:\n{proc.stderr[-3000:]}")
    for schedule in schedules:
        sweep_dir = root / schedule
        cmd = sweep_command(args, schedule, sweep_dir)
        start = time.time()
        proc = subprocess.run(
            cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=args["timeout_s"]
        )
        wall = time.time() - start
        (root / f"{schedule}_driver.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(
                f"the {schedule} study failed; see {root / f'{schedule}_driver.log'}:\n" + proc.stderr[-3000:]
            )
        result[schedule] = {"wall_s": wall, **measure_study(sweep_dir, study_name, slow, startup, slurm)}
    if "async" in result and "batch" in result:
        result["batch_over_async_wall"] = result["batch"]["wall_s"] / result["async"]["wall_s"]
        result["batch_over_async_study"] = result["batch"]["study_s"] / result["async"]["study_s"]
    text = json.dumps(result, indent=2)
    print(text)
    print(summary(result))
    if args["out"]:
        Path(args["out"]).write_text(text + "\n")
    return result


def summary(result: dict[str, Any]) -> str:
    """A few lines for humans: wall times and median / max overheads per schedule."""
    lines = [
        f"{result['trials']} trials, parallelism {result['parallelism']}, task={result['task']}, "
        f"launcher={result['launcher']}, slow trials {result['slow_trials']}; "
        f"python start-up {result['python_startup_s']:.2f} s"
    ]
    names = {
        "submit_to_process": "submission -> process start",
        "process_to_first_step": "process start -> first step",
        "submit_to_first_step": "submission -> first step",
        "submit_to_first_step_beyond_startup": "  the same beyond python start-up",
        "last_step_to_recorded": "last step -> recorded in the study",
    }
    for schedule in SCHEDULES:
        r = result.get(schedule)
        if r is None:
            continue
        submissions = (
            "" if r["slurm_submissions"] is None else f", {r['slurm_submissions']} SLURM submissions"
        )
        lines.append(
            f"{schedule}: wall {r['wall_s']:.1f} s (study {r['study_s']:.1f} s), {r['launch_calls']} launch "
            f"calls{submissions}; per trial, median / max:"
        )
        for key, name in names.items():
            s = r["overheads"][key]
            if s is not None:
                lines.append(f"    {name:<36} {s['median']:6.2f} / {s['max']:6.2f} s")
    if "batch_over_async_wall" in result:
        lines.append(f"batch / async wall time: {result['batch_over_async_wall']:.2f}")
    return "\n".join(lines)
