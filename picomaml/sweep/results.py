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


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """``trials.csv``: one row per trial with state, value, params, last reported step and error."""
    trials = study.trials
    param_names = sorted({name for t in trials for name in t.params})
    header = ["number", "state", "value", "started", "completed", "duration_s", "last_step"]
    header += [f"params_{n}" for n in param_names] + [ERROR_ATTR]
    rows = []
    for t in trials:
        duration = t.duration.total_seconds() if t.duration is not None else None
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        row = [t.number, t.state.name, t.value, t.datetime_start, t.datetime_complete, duration, last_step]
        row += [t.params.get(n) for n in param_names] + [t.user_attrs.get(ERROR_ATTR)]
        rows.append(["" if v is None else v for v in row])
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optimization history, param importances, parallel coordinates and intermediate values.

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
