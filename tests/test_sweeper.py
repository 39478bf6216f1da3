"""picomaml's optuna sweeper end to end on the tiny app in tests/sweep_app (no training needed).

One asynchronous sweep on submitit_local (6 trials, 2 at a time) is shared by the first tests: it has
an enqueued trial that raises, one that returns NaN and one that is slow. The resume test then reruns
it with more trials, so it must stay last among them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from picomaml.sweep.space import encode_value, grid_of, parse_search_space
from picomaml.sweep.study import build_sampler, resolve_storage_url

APP = Path(__file__).parent / "sweep_app" / "app.py"
STUDY = "picomaml"


def run_sweep(
    sweep_dir: Path,
    *overrides: str,
    launcher: str = "submitit_local",
    sweeper: str = "picomaml_optuna",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(APP),
        "-m",
        f"hydra/sweeper={sweeper}",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=sweep_dir.parent, capture_output=True, text=True, timeout=240, env=env)


def load_study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def timing(sweep_dir: Path, number: int) -> dict[str, float]:
    return json.loads((sweep_dir / str(number) / "timing.json").read_text())


def dir_digest(path: Path) -> dict[str, tuple[float, str]]:
    return {
        str(p.relative_to(path)): (p.stat().st_mtime, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# trial 0 raises (x above fail_above), trial 1 returns NaN (y above nan_above), trial 2 is slow
FIRST_SWEEP = (
    "x=interval(0,0.8)",
    "y=interval(0,0.9)",
    "model=choice(tiny,small)",
    "fail_above=0.85",
    "nan_above=0.95",
    "slow_trial=2",
    "slow_step_sleep=3.0",
    "hydra.sweeper.enqueue=[{x:0.9,y:0.5,model:tiny},{x:0.5,y:0.99,model:tiny}]",
    "hydra.sweeper.n_trials=6",
    "hydra.sweeper.parallelism=2",
    "hydra.sweeper.sampler.seed=0",
)


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("sweeps") / "async"
    proc = run_sweep(sweep_dir, *FIRST_SWEEP)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return sweep_dir


def test_sweep_completes_and_writes_results(first_sweep: Path) -> None:
    study = load_study(first_sweep)
    assert len(study.trials) == 6
    assert all(t.state.is_finished() for t in study.trials)
    assert sorted(p.name for p in first_sweep.iterdir() if p.name.isdigit()) == [str(i) for i in range(6)]
    for t in study.trials:
        overrides = yaml.safe_load((first_sweep / str(t.number) / ".hydra" / "overrides.yaml").read_text())
        assert f"++sweep.trial_number={t.number}" in overrides

    best = yaml.safe_load((first_sweep / "best.yaml").read_text())
    assert best["best_trial"] == study.best_trial.number
    assert best["best_value"] == pytest.approx(study.best_value)
    assert f"model={best['best_params']['model']}" in best["overrides"]
    assert not any("sweep." in o for o in best["overrides"])
    with (first_sweep / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == list(range(6))
    for name in ("history", "parallel_coordinate", "param_importances"):
        assert (first_sweep / "plots" / f"{name}.html").stat().st_size > 0
        assert (first_sweep / "plots" / f"{name}.png").stat().st_size > 0


def test_failed_trials_are_isolated(first_sweep: Path) -> None:
    trials = load_study(first_sweep).trials
    assert trials[0].state == TrialState.FAIL
    assert "fail_above" in trials[0].user_attrs["error"]
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs["error"] == "returned nan"
    assert json.loads((first_sweep / "0" / "result.json").read_text())["status"] == "failed"
    assert all(t.state == TrialState.COMPLETE for t in trials[2:])


def test_trials_run_asynchronously(first_sweep: Path) -> None:
    slow = timing(first_sweep, 2)
    inside = [
        n
        for n in range(6)
        if n != 2
        and slow["start"] < timing(first_sweep, n)["start"] < timing(first_sweep, n)["end"] < slow["end"]
    ]
    # with batches of 2 only the slow trial's batch partner could run inside it
    assert len(inside) >= 2, f"trials run while trial 2 runs: {inside}"
    study = load_study(first_sweep)
    for t in study.trials:
        tm = timing(first_sweep, t.number)
        start = tm["start"] - t.user_attrs["submitted_at"]
        recorded = t.datetime_complete.timestamp() - tm["end"]
        print(
            f"trial {t.number}: submission -> task start {start:.2f}s, task end -> recorded {recorded:.2f}s"
        )


def test_rerun_continues_the_study(first_sweep: Path) -> None:
    before = {n: dir_digest(first_sweep / str(n)) for n in range(6)}
    proc = run_sweep(first_sweep, *FIRST_SWEEP[:-3], "hydra.sweeper.n_trials=8", "hydra.sweeper.plots=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = load_study(first_sweep).trials
    assert [t.number for t in trials] == list(range(8))
    assert all(t.state.is_finished() for t in trials)
    assert {n: dir_digest(first_sweep / str(n)) for n in range(6)} == before
    assert (first_sweep / "6" / "result.json").exists() and (first_sweep / "7" / "result.json").exists()
    # a third run with the same n_trials has nothing left to do (and launches nothing: basic is enough)
    rerun = (*FIRST_SWEEP[:-3], "hydra.sweeper.n_trials=8", "hydra.sweeper.plots=false")
    proc = run_sweep(first_sweep, *rerun, launcher="basic")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(load_study(first_sweep).trials) == 8


def test_median_pruner_prunes_the_bad_region(tmp_path: Path) -> None:
    # two good trials first, then two from a region much worse at every step
    enqueue = "[{x:0.3,y:0.7},{x:0.31,y:0.69},{x:0.99,y:0.01},{x:0.98,y:0.02}]"
    sweep_dir = tmp_path / "prune"
    proc = run_sweep(
        sweep_dir,
        "x=interval(0,1)",
        "y=interval(0,1)",
        "steps=6",
        "step_sleep=0.0",
        f"hydra.sweeper.enqueue={enqueue}",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.pruner.name=median",
        "hydra.sweeper.pruner.n_startup_trials=2",
        "hydra.sweeper.pruner.n_warmup_steps=1",
        "hydra.sweeper.plots=false",
        launcher="basic",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = load_study(sweep_dir).trials
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2
    assert [t.state for t in trials[2:]] == [TrialState.PRUNED] * 2
    assert max(trials[2].intermediate_values) == 1  # stopped right after the warmup step
    assert json.loads((sweep_dir / "2" / "result.json").read_text())["status"] == "pruned"


def test_hyperband_pruner_prunes_the_bad_region(tmp_path: Path) -> None:
    # four good trials run first (the basic launcher runs them one by one), then four much worse ones
    good = ",".join(f"{{x:0.3{i},y:0.7}}" for i in range(4))
    bad = ",".join(f"{{x:0.9{i},y:0.1}}" for i in range(4))
    sweep_dir = tmp_path / "hyperband"
    proc = run_sweep(
        sweep_dir,
        "x=interval(0,1)",
        "y=interval(0,1)",
        "steps=9",
        "step_sleep=0.0",
        f"hydra.sweeper.enqueue=[{good},{bad}]",
        "hydra.sweeper.n_trials=8",
        "hydra.sweeper.pruner.name=hyperband",
        "hydra.sweeper.pruner.min_resource=1",
        "hydra.sweeper.pruner.max_resource=9",
        "hydra.sweeper.plots=false",
        launcher="basic",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [t.state for t in load_study(sweep_dir).trials]
    assert states[:4] == [TrialState.COMPLETE] * 4
    assert states[4:].count(TrialState.PRUNED) >= 2, states


def test_journal_storage_and_successive_halving(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "journal"
    journal = tmp_path / "shared" / "study.log"
    proc = run_sweep(
        sweep_dir,
        "x=interval(0,1)",
        "step_sleep=0",
        f"hydra.sweeper.storage=journal:{journal}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.pruner.name=successive_halving",
        "hydra.sweeper.pruner.min_resource=1",
        "hydra.sweeper.plots=false",
        launcher="basic",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (sweep_dir / "optuna.db").exists()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials)
    assert trials[0].intermediate_values  # the reporter wrote through the journal


def test_max_failures_stops_a_study_that_fails_everywhere(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "allfail"
    overrides = (
        "x=interval(0,1)",
        "fail_above=-1",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.max_failures=2",
    )
    proc = run_sweep(sweep_dir, *overrides, "hydra.sweeper.plots=false", launcher="basic")
    assert proc.returncode != 0
    assert "2 trials failed in this run (max_failures=2)" in proc.stderr
    assert [t.state for t in load_study(sweep_dir).trials] == [TrialState.FAIL] * 2


@pytest.mark.parametrize("schedule", ["async", "batch"])
def test_enqueued_values_the_distribution_rejects_fail_alone(tmp_path: Path, schedule: str) -> None:
    """Trial 1 enqueues a negative value for a log-scale param and trial 3 a choice that does not
    exist: optuna would raise inside `study.ask` (the driver dies); each fails alone, without a job.
    Trial 2's value is outside the interval but usable, and runs as given. In batch mode the failures
    leave gaps in the job numbers, so the batches are [0], [2], [4, 5]."""
    sweep_dir = tmp_path / schedule
    enqueue = "[{x:0.5,model:tiny},{x:-1.0},{x:0.95,model:small},{model:huge}]"
    proc = run_sweep(
        sweep_dir,
        "x=tag(log, interval(0.01, 0.8))",
        "model=choice(tiny,small)",
        "step_sleep=0",
        f"hydra.sweeper.enqueue={enqueue}",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.parallelism=2",
        f"hydra.sweeper.schedule={schedule}",
        "hydra.sweeper.plots=false",
        launcher="basic",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = load_study(sweep_dir).trials
    ok, failed = TrialState.COMPLETE, TrialState.FAIL
    assert [t.state for t in trials] == [ok, failed, ok, failed, ok, ok]
    log_scale = "x=tag(log, interval(0.01, 0.8)): a float in [0.01, 0.8] (log scale)"
    assert trials[1].user_attrs["error"].startswith(f"enqueued x=-1.0 is not allowed by {log_scale}")
    choices = "model=choice(tiny,small): one of ['tiny', 'small']"
    assert trials[3].user_attrs["error"].startswith(f"enqueued model='huge' is not allowed by {choices}")
    assert trials[2].params == {"x": 0.95, "model": "small"}
    assert "outside x=tag(log, interval(0.01, 0.8))" in proc.stdout + proc.stderr
    # no job for the failed ones; every job dir holds the trial of its number
    assert sorted(int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()) == [0, 2, 4, 5]
    for n in (0, 2, 4, 5):
        overrides = yaml.safe_load((sweep_dir / str(n) / ".hydra" / "overrides.yaml").read_text())
        assert f"++sweep.trial_number={n}" in overrides
    with (sweep_dir / "trials.csv").open() as f:
        assert "enqueued model='huge'" in [r["error"] for r in csv.DictReader(f)][3]


def test_batch_schedule_waits_for_every_trial_of_a_batch(tmp_path: Path) -> None:
    """schedule=batch (hydra-optuna-sweeper's blocking batches): trials 0 and 1 go out in one launch
    call and trials 2 and 3 only start once slow trial 0 has ended."""
    sweep_dir = tmp_path / "batch"
    proc = run_sweep(
        sweep_dir,
        "x=interval(0,1)",
        "slow_trial=0",
        "slow_step_sleep=0.6",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.schedule=batch",
        "hydra.sweeper.plots=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = load_study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    submitted = [t.user_attrs["submitted_at"] for t in trials]
    assert submitted[0] == submitted[1] < submitted[2] == submitted[3]
    slow_end = timing(sweep_dir, 0)["end"]
    assert timing(sweep_dir, 1)["end"] < slow_end  # the fast one of the batch ended first, then waited
    assert min(timing(sweep_dir, n)["start"] for n in (2, 3)) > slow_end
    assert "batch of trials [0, 1]: one launch" in proc.stdout + proc.stderr


def _bogus_slurm_conf(tmp_path: Path) -> Path:
    # a controller on a port where nothing listens: `scontrol ping` says DOWN, sbatch retries ~10 s
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=unreachable\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
        "NodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost Default=YES\n"
    )
    return conf


SLURM_PROFILE = (f"hydra.searchpath=[file://{APP.parents[2] / 'conf'}]", "hydra.launcher.gpus_per_node=null")


@pytest.mark.parametrize("sweeper", ["picomaml_optuna", "basic"])
@pytest.mark.parametrize("why", ["not installed", "controller down"])
def test_unreachable_slurm_fails_before_any_job(tmp_path: Path, sweeper: str, why: str) -> None:
    """hydra/launcher=slurm when SLURM does not answer: one message, no job, for an optuna sweep and for
    a grid multirun (Hydra's basic sweeper) alike. The shared cluster keeps running: the driver gets a
    PATH without SLURM's commands, or a slurm.conf whose controller port is closed."""
    if why == "not installed":
        env = {**os.environ, "PATH": str(tmp_path / "empty")}
        message = "the SLURM launcher needs sbatch and scontrol, not on PATH here: nothing was submitted"
    else:
        if shutil.which("scontrol") is None:
            pytest.skip("SLURM's client commands are not installed")
        env = {**os.environ, "SLURM_CONF": str(_bogus_slurm_conf(tmp_path))}
        message = "the SLURM controller is not reachable (`scontrol ping`: Slurmctld(primary) at"
    space = "x=interval(0,1)" if sweeper == "picomaml_optuna" else "x=0.1,0.2"
    sweep_dir = tmp_path / "slurm"
    start = time.time()
    proc = run_sweep(sweep_dir, *SLURM_PROFILE, space, launcher="slurm", sweeper=sweeper, env=env)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 30
    assert not (sweep_dir / ".submitit").exists()
    assert not sweep_dir.exists() or not any(p.name.isdigit() for p in sweep_dir.iterdir())


def test_resume_fails_trials_left_running_by_a_killed_driver(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "killed"
    sweep_dir.mkdir()
    # what a SIGKILLed driver leaves: a RUNNING trial in the storage and its half-written job dir
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    (sweep_dir / "0").mkdir()
    (sweep_dir / "0" / "partial.txt").write_text("from the killed driver")
    overrides = ("x=interval(0,1)", "hydra.sweeper.n_trials=2", "hydra.sweeper.plots=false")
    proc = run_sweep(sweep_dir, *overrides, launcher="basic")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [t.state for t in load_study(sweep_dir).trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert sorted(p.name for p in (sweep_dir / "0").iterdir()) == ["partial.txt"]


def test_unknown_trial_dirs_are_never_written_into(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "reused"
    (sweep_dir / "0").mkdir(parents=True)  # e.g. a grid multirun, or a sweep whose optuna.db was deleted
    proc = run_sweep(sweep_dir, "x=interval(0,1)", launcher="basic")
    assert proc.returncode != 0
    assert "holds trial dirs [0] that study 'picomaml'" in proc.stderr, proc.stderr[-3000:]
    assert list((sweep_dir / "0").iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["x=interval(0,1)", "hydra.sweeper.n_trials=0"], "n_trials must be >= 1"),
        (["x=interval(0,1)", "nokey=interval(0,1)"], "does not compose with the config"),
        (["x=interval(0,1)", "model=choice(tiny,huge)"], "does not compose with the config"),
        (
            ["x=interval(0,1)", "hydra.sweeper.storage=nosuchdb://x"],
            "cannot open optuna storage 'nosuchdb://x'",
        ),
        (
            ["x=interval(0,1)", "hydra.sweeper.storage=sqlite:////proc/no/such/dir/optuna.db"],
            "cannot open optuna storage 'sqlite:////proc/no/such/dir/optuna.db'",
        ),
        (["x=interval(0,1)", "hydra/launcher=nosuchlauncher"], "hydra/launcher/nosuchlauncher"),
        (
            ["x=interval(0,1)", "hydra.sweeper.schedule=sync"],
            "hydra.sweeper.schedule must be one of ('async', 'batch'), got 'sync'",
        ),
        (
            ["x=interval(0,1)", "hydra.sweeper.enqueue=[{x:0.5},{y:0.1}]"],
            "hydra.sweeper.enqueue[1] sets ['y'], which are not searched params (searched: ['x'])",
        ),
    ],
)
def test_bad_input_fails_before_any_trial(tmp_path: Path, overrides: list[str], message: str) -> None:
    sweep_dir = tmp_path / "bad"
    proc = run_sweep(sweep_dir, *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not sweep_dir.exists() or not any(p.name.isdigit() for p in sweep_dir.iterdir())


def test_search_space_maps_override_grammar_to_optuna() -> None:
    space = parse_search_space(
        {"lr": "tag(log, interval(1e-4, 1e-2))", "steps": "range(1,6)", "seed": 3, "model": "choice(a,b)"},
        ["ratio=interval(0,1)", "k=tag(int, interval(1, 8))", "model=choice(tiny,small)", "+extra=on"],
    )
    d = optuna.distributions
    assert space.distributions == {
        "lr": d.FloatDistribution(1e-4, 1e-2, log=True),
        "steps": d.IntDistribution(1, 5),
        "model": d.CategoricalDistribution(["tiny", "small"]),
        "ratio": d.FloatDistribution(0.0, 1.0),
        "k": d.IntDistribution(1, 8),
    }
    assert space.fixed == ["seed=3", "+extra=on"]
    params = {"lr": 1e-3, "steps": 2, "model": "tiny", "ratio": 0.5, "k": 3}
    assert space.overrides(params) == [
        "seed=3",
        "+extra=on",
        "lr=0.001",
        "steps=2",
        "ratio=0.5",
        "k=3",
        "model=tiny",
    ]
    with pytest.raises(ValueError, match="continuous"):
        grid_of(space)
    with pytest.raises(ValueError, match="unknown sampler 'nosuch'"):
        build_sampler({"name": "nosuch"})
    assert grid_of(parse_search_space({"a": "range(0,1,0.25)", "b": "choice(x,y)"}, [])) == {
        "a": [0.0, 0.25, 0.5, 0.75],
        "b": ["x", "y"],
    }


def test_encode_value_round_trips_through_hydra() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    values = ["tiny", "11m", "1", "true", "null", "sqlite:////tmp/a b/optuna.db", "it's", 3, 0.1, 1e-5, True]
    for value in [*values, None]:
        assert parser.parse_override(f"k={encode_value(value)}").value() == value
    assert math.isnan(parser.parse_override(f"k={encode_value(math.nan)}").value())


def test_storage_urls_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_storage_url(None, Path("sw")) == f"sqlite:///{tmp_path}/sw/optuna.db"
    assert resolve_storage_url("sqlite:///rel.db", Path("sw")) == f"sqlite:///{tmp_path}/rel.db"
    assert resolve_storage_url("journal:j.log", Path("sw")) == f"journal:{tmp_path}/j.log"
    assert resolve_storage_url("postgresql://u@h/db", Path("sw")) == "postgresql://u@h/db"
