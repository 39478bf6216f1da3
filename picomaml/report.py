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
(default: the sweep dir).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from picomaml.cli import main_guard, parse_cli_args

# overrides added by the optuna sweeper for the trial reporter; not hyperparameters
SWEEP_OVERRIDE = re.compile(r"^\+{0,2}sweep\.")
STEP_COLUMNS = ("step", "epoch")


@dataclass
class JobRecord:
    """What the report knows about one job of the sweep."""

    job: int
    path: Path
    overrides: list[str]
    params: dict[str, str]
    status: str = "missing"
    metric: float | None = None
    wall_time_s: float | None = None
    tokens_seen: int | None = None
    final: dict[str, float] = field(default_factory=dict)
    # (step, value) pairs of the learning-curve metric
    curve: list[tuple[float, float]] = field(default_factory=list)


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read_metrics(job_dir: Path, metric: str) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """Last value of every column and the ``metric`` curve from the job's metrics.csv files."""
    files = sorted(job_dir.rglob("metrics.csv"), key=lambda p: (len(p.parts), _version(p), str(p)))
    final: dict[str, float] = {}
    curve: list[tuple[float, float]] = []
    for path in files:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                # Lightning writes sparse rows: only the metrics logged at that step are filled
                for name, text in row.items():
                    value = _float(text)
                    if name and name not in STEP_COLUMNS and value is not None:
                        final[name] = value
                step, value = _float(row.get("step")), _float(row.get(metric))
                if step is not None and value is not None:
                    curve.append((step, value))
    return final, curve


def _version(path: Path) -> int:
    match = re.search(r"version_(\d+)", str(path))
    return int(match.group(1)) if match else -1


def _trial_states(sweep_dir: Path) -> dict[int, str]:
    path = sweep_dir / "trials.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {int(r["number"]): r["state"].lower() for r in csv.DictReader(f)}


def _job_number(job_dir: Path) -> int | None:
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.exists():
        num = (yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra", {}).get("job", {}).get("num")
        if isinstance(num, int):
            return num
    return int(job_dir.name) if job_dir.name.isdigit() else None


def collect(sweep_dir: Path, metric: str = "val/loss") -> list[JobRecord]:
    """Reads every job dir under ``sweep_dir``, sorted by job number."""
    states = _trial_states(sweep_dir)
    records = []
    for overrides_file in sweep_dir.rglob(".hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        number = _job_number(job_dir)
        if number is None:
            continue
        overrides = [
            o for o in (yaml.safe_load(overrides_file.read_text()) or []) if not SWEEP_OVERRIDE.match(o)
        ]
        params = {}
        for o in overrides:
            key, _, value = o.partition("=")
            params[key.lstrip("+~")] = value
        rec = JobRecord(job=number, path=job_dir, overrides=overrides, params=params)
        result_file = job_dir / "result.json"
        if result_file.exists():
            result = json.loads(result_file.read_text())
            rec.status = str(result.get("status", "unknown"))
            rec.metric = _float(result.get("metric"))
            rec.wall_time_s = _float(result.get("wall_time_s"))
            tokens = result.get("tokens_seen")
            rec.tokens_seen = int(tokens) if tokens is not None else None
        elif number in states:
            rec.status = states[number]
        rec.final, rec.curve = _read_metrics(job_dir, metric)
        records.append(rec)
    return sorted(records, key=lambda r: r.job)


def group_value(rec: JobRecord, key: str) -> str:
    """The job's value of ``key``: its override, else the value in its composed ``.hydra/config.yaml``."""
    if key in rec.params:
        return rec.params[key]
    config = rec.path / ".hydra" / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.load(config), key, default=None)
        if value is not None:
            return str(value)
    return "?"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str) and "." in value and _float(value) is not None:
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
    for value, members in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        metrics = [r.metric for r in members if r.metric is not None]
        done = sum(r.status == "completed" for r in members)
        stats = [statistics.mean(metrics), min(metrics), max(metrics)] if metrics else [None] * 3
        rows.append([value, len(members), done, *stats])
    return [key, "jobs", "completed", "mean metric", "min metric", "max metric"], rows


def _sort_key(value: str) -> tuple[int, float, str]:
    number = _float(value)
    return (0, number, value) if number is not None else (1, 0.0, value)


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
    values = sorted(set(group.values()), key=_sort_key)
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
    """Writes ``report.csv``, ``report.md`` and ``curves.png``; returns their paths by name."""
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
    written["md"].write_text("\n".join(md) + "\n")
    if plot_curves(records, metric, out / "curves.png", group_by):
        written["png"] = out / "curves.png"
    return written


@dataclass
class ReportArgs:
    """Arguments of ``python -m picomaml.report`` (key=value).

    sweep_dir: a multirun dir (holds one dir per job). group_by: config key to group curves and
    summaries by, e.g. model. metric: metrics.csv column to plot. out: where to write the report
    (default: the sweep dir).
    """

    sweep_dir: str
    group_by: str | None = None
    metric: str = "val/loss"
    out: str | None = None


def _main(argv: list[str]) -> dict[str, Path]:
    args = parse_cli_args(ReportArgs, argv, "picomaml.report")
    if not Path(args.sweep_dir).is_dir():
        raise FileNotFoundError(f"sweep_dir={args.sweep_dir} is not a directory")
    written = write_report(
        Path(args.sweep_dir), args.group_by, args.metric, Path(args.out) if args.out else None
    )
    for path in written.values():
        print(path)
    return written


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """CLI entry point (see the module docstring)."""
    return main_guard(_main, argv)


if __name__ == "__main__":
    main()
