"""One table and one figure for a whole multirun (a grid sweep or an optuna sweep).

    python -m picomaml.report sweep_dir=<dir> [group_by=KEY] [metric=val/loss] [out=DIR]

Every job dir of the sweep (a dir holding ``.hydra/overrides.yaml``) becomes one row:

* ``job``: Hydra's job number (``hydra.job.num``; for optuna sweeps, the trial number);
* ``status``, ``metric``, ``wall_time_s``, ``tokens_seen`` from the job's ``result.json``, which
  ``picomaml.train`` writes at the end of every run, failed and pruned ones included::

      {"metric": 2.31, "status": "completed", "wall_time_s": 512.4, "tokens_seen": 4194304}

  (``status`` is ``completed``, ``pruned`` or ``failed``; ``metric`` is the returned value, null if
  none). A job without ``result.json`` (killed, still running) takes its status from the sweep's
  ``trials.csv`` when there is one, else ``missing``;
* one column per overridden key (the sweeper's own ``sweep.*`` keys left out);
* ``final/<name>``: the last logged value of every column of the job's Lightning ``metrics.csv``
  (searched anywhere under the job dir; the ``version_N`` dirs of a resumed run are read in order).

It writes ``report.csv``, ``report.md`` (the table plus per-group summaries) and ``curves.png``
(``metric`` against step for every job, one color per value of ``group_by``) to ``out``
(default: the sweep dir). For a multi-objective optuna sweep (``hydra.sweeper.directions``) report.md
also lists the Pareto front (from the sweep's ``trials.csv``: trial, one column per objective, params)
and ``pareto.png`` plots every complete trial on the first two objectives with the front joined.

``study=true`` reports an ``experiment=ar_vs_hybrid`` sweep instead (:mod:`picomaml.eval.study`):
``study.md`` and ``study.csv`` (per model size and metric, each arm's mean and 95% CI over seeds and
the paired difference hybrid - AR, beside the step-0 control and the TF-IDF floor, and the tokens each
arm saw), ``study_scaling.png`` (every metric against parameter count) and ``study_adaptation.png``
(downstream accuracy against fine-tuning steps)::

    python -m picomaml.report sweep_dir=outputs/ar_vs_hybrid/multirun/<date>/<time> study=true

``numeric=true`` reports an ``experiment=attention_compare`` sweep (:mod:`picomaml.eval.compare`):
``numeric.md`` and ``numeric.csv`` (per sequence kind and length L, 2L, 4L, each arm's number-token
accuracy and greedy-continuation exact match with 95% CIs over seeds, the paired difference from the
baseline arm and the step-0 control; arms are the values of ``group_by``, default ``model.attention``)
and ``numeric_loss_curves.png`` (every arm's loss curves on one figure)::

    python -m picomaml.report sweep_dir=outputs/attention_compare/multirun/<date>/<time> numeric=true
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picomaml.cli import main_guard, parse_cli_args
from picomaml.eval.compare import ARM_KEY, write_compare
from picomaml.eval.study import JobRecord, collect, float_or_none, group_value, sort_key, write_study
from picomaml.sweep.front import plot_front, read_front

__all__ = ["JobRecord", "collect", "group_value", "main", "write_report"]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str) and "." in value and float_or_none(value) is not None:
        value = float(value)  # an optuna-sampled override: 0.5177067085432894 reads better as 0.517707
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _table(records: list[JobRecord]) -> tuple[list[str], list[list[Any]]]:
    keys = list(dict.fromkeys(k for r in records for k in r.params))
    finals = sorted({k for r in records for k in r.final})
    header = ["job", "status", "metric", "wall_time_s", "tokens_seen", *keys, *(f"final/{k}" for k in finals)]
    rows = [
        [r.job, r.status, r.metric, r.wall_time_s, r.tokens_seen]
        + [r.params.get(k) for k in keys]
        + [r.final.get(k) for k in finals]
        for r in records
    ]
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _group_summary(records: list[JobRecord], key: str) -> tuple[list[str], list[list[Any]]]:
    groups: dict[str, list[JobRecord]] = {}
    for r in records:
        groups.setdefault(group_value(r, key), []).append(r)
    rows = []
    for value, members in sorted(groups.items(), key=lambda kv: sort_key(kv[0])):
        metrics = [r.metric for r in members if r.metric is not None]
        done = sum(r.status == "completed" for r in members)
        stats = [statistics.mean(metrics), min(metrics), max(metrics)] if metrics else [None] * 3
        rows.append([value, len(members), done, *stats])
    return [key, "jobs", "completed", "mean metric", "min metric", "max metric"], rows


def plot_curves(records: list[JobRecord], metric: str, path: Path, group_by: str | None) -> bool:
    """Learning curves of ``metric``, one color per group; False when no job logged the metric.

    Up to 10 groups get distinct colors and a legend entry each; more (an optuna sweep over a float)
    are colored along a gradient in sorted order, with the two ends in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curves = [r for r in records if r.curve]
    if not with_curves:
        return False
    group = {r.job: group_value(r, group_by) if group_by else "" for r in with_curves}
    values = sorted(set(group.values()), key=sort_key)
    if len(values) <= 10:
        colors = [plt.get_cmap("tab10")(i) for i in range(len(values))]
        labelled = values
    else:
        colors = [plt.get_cmap("viridis")(i / (len(values) - 1)) for i in range(len(values))]
        labelled = [values[0], values[-1]]
    color_of = dict(zip(values, colors, strict=True))
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in with_curves:
        steps, ys = zip(*sorted(r.curve), strict=True)
        ax.plot(steps, ys, color=color_of[group[r.job]], alpha=0.8, linewidth=1.2)
    if group_by:
        # one legend entry per group, not per job
        for value in labelled:
            ax.plot([], [], color=color_of[value], label=f"{group_by}={value}")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(with_curves)} jobs" + (f" by {group_by}" if group_by else ""))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(
    sweep_dir: Path, group_by: str | None = None, metric: str = "val/loss", out: Path | None = None
) -> dict[str, Path]:
    """Writes ``report.csv``, ``report.md``, ``curves.png`` (and ``pareto.png`` for a multi-objective
    sweep); returns their paths by name."""
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    records = collect(sweep_dir, metric)
    if not records:
        raise FileNotFoundError(f"no job dirs (with .hydra/overrides.yaml) under {sweep_dir}")
    header, rows = _table(records)
    written = {"csv": out / "report.csv", "md": out / "report.md"}
    with written["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "overrides"])
        writer.writerows(
            [
                [*("" if v is None else v for v in row), " ".join(r.overrides)]
                for row, r in zip(rows, records, strict=True)
            ]
        )
    md = [f"# Sweep report: {sweep_dir}", "", f"{len(records)} jobs; curves of `{metric}` in curves.png.", ""]
    md.append(_markdown_table(header, rows))
    if group_by:
        md += ["", f"## By {group_by}", "", _markdown_table(*_group_summary(records, group_by))]
    front = read_front(sweep_dir)  # a multi-objective optuna sweep (hydra.sweeper.directions)
    if front is not None:
        md += ["", "## Pareto front", "", front.summary() + " All trials in pareto.png.", ""]
        md.append(_markdown_table(*front.table()))
        if plot_front(front, out / "pareto.png"):
            written["pareto"] = out / "pareto.png"
    written["md"].write_text("\n".join(md) + "\n")
    if plot_curves(records, metric, out / "curves.png", group_by):
        written["png"] = out / "curves.png"
    return written


@dataclass
class ReportArgs:
    """Arguments of ``python -m picomaml.report`` (key=value).

    sweep_dir: a multirun dir (holds one dir per job). group_by: config key to group curves and
    summaries by, e.g. model. metric: metrics.csv column to plot. out: where to write the report
    (default: the sweep dir). study: true reports an experiment=ar_vs_hybrid sweep (study.md,
    study.csv, study_scaling.png, study_adaptation.png) instead of the plain sweep table. numeric: true
    reports an experiment=attention_compare sweep (numeric.md, numeric.csv, numeric_loss_curves.png),
    its arms the values of group_by (default model.attention).
    """

    sweep_dir: str
    group_by: str | None = None
    metric: str = "val/loss"
    out: str | None = None
    study: bool = False
    numeric: bool = False


def _main(argv: list[str]) -> dict[str, Path]:
    args = parse_cli_args(ReportArgs, argv, "picomaml.report")
    if not Path(args.sweep_dir).is_dir():
        raise FileNotFoundError(f"sweep_dir={args.sweep_dir} is not a directory")
    out = Path(args.out) if args.out else None
    if args.study and args.numeric:
        raise ValueError("study=true and numeric=true are two different reports: choose one")
    if args.numeric:
        written = write_compare(Path(args.sweep_dir), out, args.group_by or ARM_KEY)
    elif args.study:
        written = write_study(Path(args.sweep_dir), out)
    else:
        written = write_report(Path(args.sweep_dir), args.group_by, args.metric, out)
    for path in written.values():
        print(path)
    return written


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """CLI entry point (see the module docstring)."""
    return main_guard(_main, argv)


if __name__ == "__main__":
    main()
