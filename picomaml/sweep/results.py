"""What an optuna sweep leaves in its sweep dir: ``best.yaml``, ``trials.csv`` and ``plots/``.

``best.yaml`` and ``trials.csv`` are rewritten after every finished trial (cheap, and a sweep that runs
for days can be watched); the plots are drawn once when the sweep ends.
"""

from __future__ import annotations

import csv
import logging
import shlex
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# trial user attributes set by the sweeper
OVERRIDES_ATTR = "overrides"
ERROR_ATTR = "error"
SUBMITTED_ATTR = "submitted_at"
RETURNED_ATTR = "returned_at"
# how a trial ended in picomaml's words, where optuna's state says less (picomaml.sweep.memory_budget):
# over_budget (predicted over hydra.sweeper.memory_budget_gb, not launched) or oom (ran out of memory)
STATUS_ATTR = "status"
PREDICTED_MEMORY_ATTR = "predicted_memory_gb"
# trials.csv column of a multi-objective study: the trial is on the Pareto front (study.best_trials)
PARETO_COLUMN = "pareto"


def _atomic_write(path: Path, text: str) -> None:
    # a reader (the report, a user's `cat`) never sees a half-written file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_best(study: optuna.Study, path: Path) -> None:
    """``best.yaml``: the best trial's number, value, params and the overrides to rerun it alone.

    ``rerun`` is what to append to the entry point (``python -m picomaml.train <rerun>``);
    ``hydra.mode=RUN`` turns off the multirun that an ``hparams_search`` config switches on.
    """
    from optuna.trial import TrialState

    states = [t.state for t in study.trials]
    counts = {s.name.lower(): states.count(s) for s in TrialState if states.count(s)}
    if is_multi_objective(study):
        _atomic_write(path, yaml.safe_dump(pareto_summary(study, path.parent, counts), sort_keys=False))
        return
    data: dict[str, Any] = {"study_name": study.study_name, "direction": study.direction.name.lower()}
    data["trials"] = counts
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        overrides = list(best.user_attrs.get(OVERRIDES_ATTR, []))
        data.update(
            best_trial=best.number,
            best_value=best.value,
            best_params=dict(best.params),
            overrides=overrides,
            rerun=" ".join(shlex.quote(o) for o in [*overrides, "hydra.mode=RUN"]),
        )
    else:
        data["best_trial"] = None
    _atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def is_multi_objective(study: optuna.Study) -> bool:
    """True for a study with several directions (``hydra.sweeper.directions``)."""
    return len(study.directions) > 1


def set_metric_names(study: optuna.Study, names: list[str]) -> None:
    """Names the study's objectives (the ``optimized_metric`` keys): plot axes and column names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in optuna
        study.set_metric_names(list(names))


def stored_metric_names(study: optuna.Study) -> list[str] | None:
    """The names given by ``set_metric_names``, None when the study has none."""
    return list(study.metric_names) if study.metric_names else None


def objective_names(study: optuna.Study) -> list[str]:
    """One name per objective: the metric keys, else ``objective_0``, ``objective_1``, ..."""
    return stored_metric_names(study) or [f"objective_{i}" for i in range(len(study.directions))]


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials no other complete trial beats on every objective, best first on the first one."""
    first = study.directions[0].name.lower()
    sign = 1.0 if first == "minimize" else -1.0
    return sorted(study.best_trials, key=lambda t: (sign * t.values[0], t.number))


def pareto_summary(study: optuna.Study, sweep_dir: Path, counts: dict[str, int]) -> dict[str, Any]:
    """``best.yaml`` of a multi-objective study: every trial of the Pareto front, as ``write_best``
    describes the best trial of a single objective (values by metric name, params, overrides,
    ``rerun``), plus its run dir."""
    names = objective_names(study)
    directions = [d.name.lower() for d in study.directions]
    front = []
    for t in pareto_front(study):
        overrides = list(t.user_attrs.get(OVERRIDES_ATTR, []))
        front.append(
            {
                "number": t.number,
                "values": dict(zip(names, t.values, strict=True)),
                "params": dict(t.params),
                "overrides": overrides,
                "rerun": " ".join(shlex.quote(o) for o in [*overrides, "hydra.mode=RUN"]),
                "run_dir": str(sweep_dir / str(t.number)),
            }
        )
    return {
        "study_name": study.study_name,
        "directions": dict(zip(names, directions, strict=True)),
        "trials": counts,
        "pareto_front": front,
    }


def _value_columns(study: optuna.Study) -> tuple[list[str], Any]:
    """The value columns of ``trials.csv`` and a function giving a trial's cells for them."""
    if not is_multi_objective(study):
        return ["value"], lambda t: [t.value]
    n = len(study.directions)
    front = {t.number for t in study.best_trials}
    header = [*(f"values_{name}" for name in objective_names(study)), PARETO_COLUMN]
    return header, lambda t: [*(t.values or [None] * n), t.number in front]


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """``trials.csv``: one row per trial with state, value, params, last reported step and error.

    A multi-objective study has one ``values_<metric>`` column per objective instead of ``value``,
    and a ``pareto`` column: True for the trials of the Pareto front.
    """
    trials = study.trials
    param_names = sorted({name for t in trials for name in t.params})
    value_header, value_cells = _value_columns(study)
    header = ["number", "state", *value_header, "started", "completed", "duration_s", "last_step"]
    header += [f"params_{n}" for n in param_names] + [ERROR_ATTR, STATUS_ATTR]
    # the memory model's prediction, when the sweep has a memory budget
    memory = any(PREDICTED_MEMORY_ATTR in t.user_attrs for t in trials)
    header += [PREDICTED_MEMORY_ATTR] if memory else []
    rows = []
    for t in trials:
        duration = t.duration.total_seconds() if t.duration is not None else None
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        row = [t.number, t.state.name, *value_cells(t), t.datetime_start, t.datetime_complete, duration]
        row.append(last_step)
        row += [t.params.get(n) for n in param_names] + [t.user_attrs.get(ERROR_ATTR)]
        row.append(t.user_attrs.get(STATUS_ATTR) or t.state.name.lower())
        row += [t.user_attrs.get(PREDICTED_MEMORY_ATTR)] if memory else []
        rows.append(["" if v is None else v for v in row])
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optimization history, param importances, parallel coordinates and intermediate values; for a
    multi-objective study the Pareto front (every complete trial, the front highlighted; two or three
    objectives) and the param importances per objective.

    Each as interactive HTML (plotly; one shared ``plotly.min.js`` next to them, so they open offline)
    and as PNG (matplotlib). A plot that does not apply yet (importances need two finished trials,
    intermediate values need reports) is skipped with a log line. Returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "history": "plot_optimization_history",
        "param_importances": "plot_param_importances",
        "parallel_coordinate": "plot_parallel_coordinate",
        "intermediate_values": "plot_intermediate_values",
    }
    if is_multi_objective(study):
        # the others need one target value per trial, and optuna keeps no intermediate values here
        plots = {"pareto_front": "plot_pareto_front", "param_importances": "plot_param_importances"}
    written: list[Path] = []
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                # the matplotlib backend is tagged experimental in optuna
                warnings.simplefilter("ignore")
                fig = getattr(vis, fn)(study)
                html = out_dir / f"{name}.html"
                fig.write_html(html, include_plotlyjs="directory")
                written.append(html)
                ax = getattr(vis_mpl, fn)(study)
                fig_mpl = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                png = out_dir / f"{name}.png"
                fig_mpl.savefig(png, dpi=110, bbox_inches="tight")
                plt.close(fig_mpl)
                written.append(png)
        except Exception as e:  # a plot is a convenience: never fail a finished sweep over it
            log.info(f"skipped plot {name}: {type(e).__name__}: {e}")
    return written
