"""Multi-objective optuna sweeps (issue 12): ``hydra.sweeper.directions`` over a list ``optimized_metric``.

Most tests run the tiny app of tests/sweep_app, whose loss ``(x-0.3)^2 + (y-0.7)^2 + 1/(t+1)`` and
accuracy ``1 - (x-0.8)^2 - (y-0.7)^2/2`` pull x in opposite directions, so the trials of a study form a
real Pareto front. The front is checked from the values themselves (a trial is on it when no other
complete trial is at least as good on both objectives and better on one), not from optuna's
``best_trials``. One slow test runs ``python -m picomaml.train hparams_search=meta_optuna_pareto`` on
tiny real trainings; tests/test_slurm.py runs such a study on the local SLURM cluster.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from picomaml.report import main as report_main
from picomaml.sweep.objectives import MissingMetricError, check_returned, objective_values
from picomaml.sweep.study import build_sampler
from tests.test_sweeper import dir_digest, load_study, run_sweep

NAMES = ["val/loss", "val/acc"]
MULTI = ("optimized_metric=[val/loss,val/acc]", "hydra.sweeper.directions=[minimize,maximize]")
SPACE = ("x=interval(0,1)", "y=interval(0,1)", "step_sleep=0", "steps=3")
# two points on the front (the best loss, the best accuracy) and two far behind it
ENQUEUE = "hydra.sweeper.enqueue=[{x:0.3,y:0.7},{x:0.8,y:0.7},{x:0.05,y:0.05},{x:0.95,y:0.2}]"


def app_values(x: float, y: float, steps: int = 3) -> tuple[float, float]:
    """The tiny app's (val/loss, val/acc) at its last step, for model=tiny (offset 0)."""
    return (x - 0.3) ** 2 + (y - 0.7) ** 2 + 1.0 / steps, 1.0 - (x - 0.8) ** 2 - 0.5 * (y - 0.7) ** 2


def non_dominated(points: dict[int, tuple[float, float]]) -> set[int]:
    """Trials that no other trial beats: lower-or-equal loss and higher-or-equal accuracy, one strictly."""

    def beats(b: tuple[float, float], a: tuple[float, float]) -> bool:
        return b[0] <= a[0] and b[1] >= a[1] and (b[0] < a[0] or b[1] > a[1])

    return {n for n, p in points.items() if not any(beats(q, p) for m, q in points.items() if m != n)}


def read_trials(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pareto_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("multiobjective") / "pareto"
    proc = run_sweep(
        sweep_dir,
        *SPACE,
        *MULTI,
        ENQUEUE,
        "hydra.sweeper.n_trials=10",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.sampler.n_startup_trials=6",
        launcher="basic",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_trials_csv_has_both_values_and_the_front(pareto_sweep: Path) -> None:
    rows = read_trials(pareto_sweep)
    assert [int(r["number"]) for r in rows] == list(range(10))
    assert all(r["state"] == "COMPLETE" for r in rows)
    assert "value" not in rows[0]
    points = {}
    for r in rows:
        loss, acc = float(r["values_val/loss"]), float(r["values_val/acc"])
        assert (loss, acc) == pytest.approx(app_values(float(r["params_x"]), float(r["params_y"])))
        points[int(r["number"])] = (loss, acc)
    front = non_dominated(points)
    assert {int(r["number"]) for r in rows if r["pareto"] == "True"} == front
    assert {0, 1} <= front and not {2, 3} & front  # the enqueued ones, on and off the front
    assert {r["pareto"] for r in rows} == {"True", "False"}
    # optuna keeps no intermediate values in a multi-objective study: the app's reports are skipped
    assert all(not t.intermediate_values for t in load_study(pareto_sweep).trials)


def test_best_yaml_lists_exactly_the_front(pareto_sweep: Path) -> None:
    rows = {int(r["number"]): r for r in read_trials(pareto_sweep)}
    front = {n for n, r in rows.items() if r["pareto"] == "True"}
    best = yaml.safe_load((pareto_sweep / "best.yaml").read_text())
    assert best["directions"] == {"val/loss": "minimize", "val/acc": "maximize"}
    assert best["trials"] == {"complete": 10}
    assert "best_trial" not in best
    members = best["pareto_front"]
    assert {m["number"] for m in members} == front
    losses = [m["values"]["val/loss"] for m in members]
    assert losses == sorted(losses)  # best first on the first objective
    for m in members:
        r = rows[m["number"]]
        assert m["values"] == {
            "val/loss": pytest.approx(float(r["values_val/loss"])),
            "val/acc": pytest.approx(float(r["values_val/acc"])),
        }
        assert m["params"] == {
            "x": pytest.approx(float(r["params_x"])),
            "y": pytest.approx(float(r["params_y"])),
        }
        assert f"x={r['params_x']}" in m["overrides"] and not any("sweep." in o for o in m["overrides"])
        assert m["rerun"].endswith("hydra.mode=RUN")
        assert Path(m["run_dir"]) == pareto_sweep / str(m["number"])
        assert json.loads((Path(m["run_dir"]) / "result.json").read_text())["status"] == "completed"


def test_pareto_plot_is_written(pareto_sweep: Path) -> None:
    for suffix in ("html", "png"):
        assert (pareto_sweep / "plots" / f"pareto_front.{suffix}").stat().st_size > 1000
    assert not (pareto_sweep / "plots" / "history.html").exists()  # needs a single objective


def test_report_shows_the_front(pareto_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    written = report_main([f"sweep_dir={pareto_sweep}", f"out={out}"])
    assert written["pareto"] == out / "pareto.png" and written["pareto"].stat().st_size > 10_000
    md = (out / "report.md").read_text()
    front = {int(r["number"]) for r in read_trials(pareto_sweep) if r["pareto"] == "True"}
    section = md.split("## Pareto front", 1)[1]
    assert (
        f"{len(front)} of 10 complete trials are on the Pareto front (`val/loss` ↓, `val/acc` ↑)" in section
    )
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| trial | val/loss ↓ | val/acc ↑ | x | y |")
    assert {int(line.split("|")[1]) for line in table[1:]} == front


def test_resume_continues_the_study_and_keeps_its_directions(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "resume"
    common = (*SPACE, "hydra.sweeper.sampler.seed=1", "hydra.sweeper.plots=false")
    first = run_sweep(sweep_dir, *common, *MULTI, "hydra.sweeper.n_trials=3", launcher="basic")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {n: dir_digest(sweep_dir / str(n)) for n in range(3)}
    again = run_sweep(sweep_dir, *common, *MULTI, "hydra.sweeper.n_trials=5", launcher="basic")
    assert again.returncode == 0, again.stderr[-3000:]
    study = load_study(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert {n: dir_digest(sweep_dir / str(n)) for n in range(3)} == before
    rows = read_trials(sweep_dir)
    points = {int(r["number"]): (float(r["values_val/loss"]), float(r["values_val/acc"])) for r in rows}
    assert {int(r["number"]) for r in rows if r["pareto"] == "True"} == non_dominated(points)

    # the stored study decides: other directions, or a single objective, are refused before any trial
    cases = [
        (
            ("optimized_metric=[val/loss,val/acc]", "hydra.sweeper.directions=[minimize,minimize]"),
            "was created to ['minimize', 'maximize'], not ['minimize', 'minimize']",
        ),
        (("optimized_metric=val/loss",), "was created to ['minimize', 'maximize'], not minimize"),
        (
            ("optimized_metric=[val/acc,val/loss]", "hydra.sweeper.directions=[minimize,maximize]"),
            "optimizes ['val/loss', 'val/acc'], not ['val/acc', 'val/loss']",
        ),
    ]
    for overrides, message in cases:
        proc = run_sweep(sweep_dir, *common, *overrides, "hydra.sweeper.n_trials=7", launcher="basic")
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert len(load_study(sweep_dir).trials) == 5
    assert sorted(int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()) == list(range(5))


NO_PRUNING = (
    "pruning is not available for multi-objective studies in optuna; "
    "set hydra.sweeper.pruner.name=none or use one direction"
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((*MULTI, "hydra.sweeper.pruner.name=median"), NO_PRUNING),
        ((*MULTI, "hydra.sweeper.pruner.name=hyperband"), NO_PRUNING),
        ((*MULTI, "hydra.sweeper.direction=minimize"), "exclude each other"),
        (
            ("optimized_metric=[val/loss,val/acc]", "hydra.sweeper.directions=[minimize,maximize,minimize]"),
            "has 2 key(s) but hydra.sweeper.directions gives 3 direction(s)",
        ),
        (
            ("hydra.sweeper.directions=[minimize,maximize]",),
            "has 1 key(s) but hydra.sweeper.directions gives 2",
        ),
        (("optimized_metric=[val/loss,val/acc]",), "has 2 key(s) but hydra.sweeper.direction gives 1"),
        (
            ("optimized_metric=[val/loss,val/acc]", "hydra.sweeper.directions=[minimize,up]"),
            "hydra.sweeper.directions must be one of ('minimize', 'maximize') (each), got 'up'",
        ),
        ((*MULTI, "hydra.sweeper.sampler.name=cmaes"), "cmaes cannot search several objectives"),
    ],
)
def test_bad_objectives_fail_before_any_trial(
    tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    sweep_dir = tmp_path / "bad"
    proc = run_sweep(sweep_dir, *SPACE, *overrides, launcher="basic")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # nothing ran and no study was created
    assert not sweep_dir.exists() or not any(
        p.name.isdigit() or p.name == "optuna.db" for p in sweep_dir.iterdir()
    )


def test_a_metric_the_run_did_not_log_fails_the_trial_with_its_name(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "missing"
    proc = run_sweep(
        sweep_dir,
        *SPACE,
        "optimized_metric=[val/loss,val/accuracy]",
        "hydra.sweeper.directions=[minimize,maximize]",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.plots=false",
        launcher="basic",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for t in load_study(sweep_dir).trials:
        assert t.state == TrialState.FAIL
        assert t.user_attrs["error"] == (
            "MissingMetricError: optimized_metric ['val/loss', 'val/accuracy']: the run logged no "
            "val/accuracy; it logged ['val/acc', 'val/loss']"
        )


def test_objective_values_and_returned_values() -> None:
    metrics = {"val/loss": 2.5, "meta_test/query_acc": 0.4}
    assert objective_values("val/loss", metrics) == 2.5
    assert objective_values("val/nope", metrics) is None  # single objective: unchanged (None fails the trial)
    assert objective_values(["meta_test/query_acc", "val/loss"], metrics) == [0.4, 2.5]
    with pytest.raises(
        MissingMetricError, match=r"logged no meta_test/acc; it logged \['meta_test/query_acc'"
    ):
        objective_values(["val/loss", "meta_test/acc"], metrics)
    assert check_returned([1.0, 2], 2) == ([1.0, 2.0], None)
    assert check_returned(3, 1) == ([3.0], None)
    assert check_returned([3], 1) == ([3.0], None)  # optimized_metric=[val/loss] with one direction
    assert check_returned(1.0, 2) == (None, "returned 1.0, not a list of 2 numbers (one per direction)")
    assert check_returned([1.0, float("nan")], 2) == (None, "returned [1.0, nan]")
    assert check_returned(float("inf"), 1) == (None, "returned inf")
    assert check_returned("x", 1) == (None, "returned 'x', not a number")


def _params(sweep_dir: Path) -> list[dict[str, Any]]:
    return [t.params for t in load_study(sweep_dir).trials]


def test_nsga2_sampler_is_seeded_and_takes_constraints(tmp_path: Path) -> None:
    def constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
        return [0.0]

    sampler = build_sampler({"name": "nsga2", "seed": 3, "population_size": 4}, n_objectives=2)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler)
    with_constraints = build_sampler(
        {"name": "nsga2", "population_size": 4}, n_objectives=2, constraints_func=constraints
    )
    assert with_constraints._constraints_func is constraints
    nsga2 = ("hydra.sweeper.sampler.name=nsga2", "hydra.sweeper.sampler.population_size=3")
    runs = []
    for name in ("a", "b"):
        sweep_dir = tmp_path / name
        overrides = (*SPACE, *MULTI, *nsga2, "hydra.sweeper.sampler.seed=5", "hydra.sweeper.n_trials=7")
        proc = run_sweep(sweep_dir, *overrides, "hydra.sweeper.plots=false", launcher="basic")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(_params(sweep_dir))
        generations = [t.system_attrs["NSGAIISampler:generation"] for t in load_study(sweep_dir).trials]
        assert generations == [0, 0, 0, 1, 1, 1, 2]  # NSGA-II's generations of population_size trials
    assert runs[0] == runs[1] and len(runs[0]) == 7  # same seed, same trials, bred ones included


FAST_META = [
    "model=tiny",
    "data=wiki",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.val_batches=1",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "optim.warmup_steps=1",
    "meta.buffer_tokens=200000",
    "meta.window_len=32",
    "meta.val_episodes=2",
    "~callbacks.learning_dynamics",
]


@pytest.mark.slow
def test_meta_optuna_pareto_on_real_trainings(tmp_path: Path, cache_dir: Path) -> None:
    """``hparams_search=meta_optuna_pareto``: every trial returns [val/loss, meta_test/query_acc] of its
    last validation, as its result.json records them."""
    sweep_dir = tmp_path / "real"
    cmd = [
        sys.executable,
        "-m",
        "picomaml.train",
        "hparams_search=meta_optuna_pareto",
        "hydra/launcher=basic",
        f"hydra.sweep.dir={sweep_dir}",
        *FAST_META,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.plots=false",
    ]
    env = {**os.environ, "PICOMAML_CACHE": str(cache_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = optuna.load_study(study_name="meta_optuna_pareto", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert study.metric_names == ["val/loss", "meta_test/query_acc"]
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        result = json.loads((sweep_dir / str(t.number) / "result.json").read_text())
        assert result["metric_name"] == ["val/loss", "meta_test/query_acc"]
        assert t.values == pytest.approx(
            [result["metrics"]["val/loss"], result["metrics"]["meta_test/query_acc"]]
        )
        assert 0.0 <= t.values[1] <= 1.0
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert {m["number"] for m in best["pareto_front"]} == {t.number for t in study.best_trials}


def _slurm_sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    # run_sweep's command, with room for a queue that other jobs share
    app = Path(__file__).parent / "sweep_app" / "app.py"
    cmd = [sys.executable, str(app), "-m", "hydra/sweeper=picomaml_optuna", "hydra/launcher=slurm_local"]
    cmd += [f"hydra.sweep.dir={sweep_dir}", *overrides]
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=sweep_dir.parent, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_pareto_sweep_on_slurm(slurm_cluster: None, tmp_path: Path) -> None:
    """The same study with its trials as SLURM jobs (hydra/launcher=slurm_local, 2 at a time), resumed
    from 4 to 6 trials: the front, best.yaml, the plot and the report as in-process."""
    repo = Path(__file__).resolve().parents[1]
    sweep_dir = tmp_path / "slurm_pareto"
    slurm = (
        f"hydra.searchpath=[file://{repo / 'conf'}]",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.sampler.seed=0",
    )
    first = _slurm_sweep(sweep_dir, *slurm, *SPACE, *MULTI, ENQUEUE, "hydra.sweeper.n_trials=4")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {n: dir_digest(sweep_dir / str(n)) for n in range(4)}
    again = _slurm_sweep(sweep_dir, *slurm, *SPACE, *MULTI, "hydra.sweeper.n_trials=6")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {n: dir_digest(sweep_dir / str(n)) for n in range(4)} == before

    rows = read_trials(sweep_dir)
    assert [(int(r["number"]), r["state"]) for r in rows] == [(n, "COMPLETE") for n in range(6)]
    points = {}
    for r in rows:
        timing = json.loads((sweep_dir / r["number"] / "timing.json").read_text())
        assert timing["slurm_job_id"]  # ran as a SLURM job
        points[int(r["number"])] = (float(r["values_val/loss"]), float(r["values_val/acc"]))
        assert points[int(r["number"])] == pytest.approx(
            app_values(float(r["params_x"]), float(r["params_y"]))
        )
    front = non_dominated(points)
    assert {int(r["number"]) for r in rows if r["pareto"] == "True"} == front
    assert {0, 1} <= front and not {2, 3} & front
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert {m["number"] for m in best["pareto_front"]} == front
    assert (sweep_dir / "plots" / "pareto_front.png").stat().st_size > 1000
    report_main([f"sweep_dir={sweep_dir}"])
    assert (
        f"{len(front)} of 6 complete trials are on the Pareto front" in (sweep_dir / "report.md").read_text()
    )
