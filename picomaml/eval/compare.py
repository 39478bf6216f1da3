"""The attention comparison as numbers: the jobs of an ``experiment=attention_compare`` sweep read back,
their numeric-suite scores compared across arms paired by seed, and the arms' loss curves on one figure.

``python -m picomaml.train experiment=attention_compare`` runs a grid of ``model.attention`` (the arm:
``softmax`` or ``linear``) x seed; each job dir holds what :mod:`picomaml.eval.study` reads (its
``.hydra/`` overrides, ``result.json``, ``csv/metrics.csv``) and ``eval_results/final.json`` with the
numeric suite's keys (:mod:`picomaml.eval.numeric`) for the final and step-0 checkpoints.

:func:`write_compare` (``python -m picomaml.report sweep_dir=<dir> numeric=true``) writes

- ``numeric.md``: the token budget of each arm, then two tables, number-token accuracy and
  greedy-continuation exact match, with one row per sequence kind (and ``all``, the macro-average over
  the kinds scored at every length) and length (L, 2L, 4L terms): each arm's mean and 95% t interval
  over seeds, the paired difference ``arm - baseline`` (per seed, then averaged, with its interval;
  **bold** when it excludes 0) and the step-0 control; then the validation loss;
- ``numeric.csv``: every estimate (also ``term_acc``), one per line;
- ``numeric_loss_curves.png``: training loss (mean over seeds per arm, with its 95% band, and every seed
  thin) and validation loss against the step, all arms on one figure (equal tokens per step in every
  arm, so the x-axis is also tokens).

The statistics are :mod:`picomaml.eval.study`'s (Student t intervals; paired differences).
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

from picomaml.eval.analysis import read_metrics
from picomaml.eval.study import (
    FINAL_EVAL_FILE,
    Estimate,
    JobRecord,
    collect,
    format_estimate,
    group_value,
    mean_ci,
    paired_difference,
    scalar_scores,
    sort_key,
)

ARM_KEY = "model.attention"
NUMERIC_METRICS = {
    "token_acc": "number-token accuracy",
    "exact": "greedy continuation exact match",
    "term_acc": "continuation terms right",
}
_NUMERIC = re.compile(r"^numeric/(?P<kind>[^/]+)/x(?P<m>\d+)/(?P<metric>token_acc|exact|term_acc)$")
TRAIN_LOSS_KEYS = ("train/loss_ar", "train/loss")


@dataclass
class CompareJob:
    """One job of the comparison: its arm and seed, and the scores of its final and step-0 checkpoints."""

    record: JobRecord
    arm: str
    seed: str
    final: dict[str, float]
    step0: dict[str, float]
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def collect_compare(sweep_dir: Path, arm_key: str = ARM_KEY) -> tuple[list[CompareJob], list[JobRecord]]:
    """Jobs with a final evaluation holding numeric-suite scores, and the jobs without (listed apart)."""
    jobs, missing = [], []
    for rec in collect(sweep_dir):
        path = rec.path / FINAL_EVAL_FILE
        scores = json.loads(path.read_text()) if path.is_file() else {}
        final = scalar_scores(scores.get("final", {}))
        if not any(k.startswith("numeric/") for k in final):
            missing.append(rec)
            continue
        jobs.append(
            CompareJob(
                record=rec,
                arm=group_value(rec, arm_key),
                seed=group_value(rec, "seed"),
                final=final,
                step0=scalar_scores(scores.get("step0", {})),
                metrics=read_metrics(rec.path),
            )
        )
    return jobs, missing


def arms_in_order(jobs: Sequence[CompareJob], baseline: str | None = None) -> list[str]:
    """The arms, the baseline first (``softmax`` when present, else the first in sorted order)."""
    arms = sorted({j.arm for j in jobs}, key=sort_key)
    base = baseline if baseline is not None else ("softmax" if "softmax" in arms else arms[0])
    if base not in arms:
        raise ValueError(f"baseline={base!r} is not an arm of the sweep; arms: {', '.join(arms)}")
    return [base, *(a for a in arms if a != base)]


@dataclass(frozen=True)
class CompareRow:
    """One estimate: a score key, which checkpoint, which arm (or ``<arm> - <baseline>``), over seeds."""

    key: str
    checkpoint: str  # final | step0
    arm: str
    estimate: Estimate


def compare_rows(jobs: Sequence[CompareJob], arms: Sequence[str]) -> list[CompareRow]:
    """Per numeric score and ``loss``, per checkpoint: each arm's mean and 95% CI over seeds, and each
    other arm's paired difference from the baseline ``arms[0]`` over the seeds both ran."""
    rows: list[CompareRow] = []
    for checkpoint in ("final", "step0"):
        keys = sorted({k for j in jobs for k in getattr(j, checkpoint) if _NUMERIC.match(k) or k == "loss"})
        for key in keys:
            by_arm: dict[str, dict[str, float]] = {}
            for j in jobs:
                value = getattr(j, checkpoint).get(key)
                if value is not None and math.isfinite(value):
                    by_arm.setdefault(j.arm, {})[j.seed] = value
            for arm in arms:
                if arm in by_arm:
                    rows.append(CompareRow(key, checkpoint, arm, mean_ci(list(by_arm[arm].values()))))
            for arm in arms[1:]:
                if arm in by_arm and arms[0] in by_arm:
                    diff = paired_difference(by_arm[arms[0]], by_arm[arm])
                    if diff is not None:
                        rows.append(CompareRow(key, checkpoint, f"{arm} - {arms[0]}", diff))
    return rows


def _cells(jobs: Sequence[CompareJob]) -> list[tuple[str, int]]:
    """(kind, multiple) pairs scored, kinds in the suite's order with ``all`` last, multiples ascending."""
    found = {(m["kind"], int(m["m"])) for j in jobs for k in j.final if (m := _NUMERIC.match(k))}
    kinds = list(dict.fromkeys(kind for kind, _ in sorted(found, key=lambda c: c[0] == "all")))
    from picomaml.data.corpora import SYNTHETIC_KINDS

    kinds.sort(key=lambda k: (k == "all", SYNTHETIC_KINDS.index(k) if k in SYNTHETIC_KINDS else 99, k))
    return sorted(found, key=lambda c: (kinds.index(c[0]), c[1]))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _metric_table(
    jobs: Sequence[CompareJob], rows: Sequence[CompareRow], arms: Sequence[str], metric: str
) -> list[str]:
    cells = {(r.key, r.checkpoint, r.arm): r.estimate for r in rows}
    diffs = [f"{arm} - {arms[0]}" for arm in arms[1:]]
    control = any(r.checkpoint == "step0" for r in rows)  # scored only with final_eval.control_step set
    header = [
        "kind",
        "terms",
        *arms,
        *(f"{d} (paired)" for d in diffs),
        *(["step 0 (init)"] if control else []),
    ]
    terms = {
        int(m["m"]): j.final.get(f"numeric/x{m['m']}/terms")
        for j in jobs
        for k in j.final
        if (m := _NUMERIC.match(k))
    }
    table = []
    for kind, mult in _cells(jobs):
        key = f"numeric/{kind}/x{mult}/{metric}"
        if not any(k == key for k, _, _ in cells):
            continue
        n_terms = terms.get(mult)
        label = f"{mult}L" if mult > 1 else "L"
        line = [kind, f"{label} = {n_terms:.0f}" if n_terms else label]
        line += [format_estimate(cells.get((key, "final", arm))) for arm in arms]
        for d in diffs:
            est = cells.get((key, "final", d))
            text = format_estimate(est, interval=True)
            line.append(f"**{text}**" if est is not None and est.excludes_zero else text)
        if control:
            step0 = [cells.get((key, "step0", arm)) for arm in arms]
            line.append(format_estimate(next((e for e in step0 if e is not None), None)))
        table.append(line)
    return _md_table(header, table)


def markdown_report(
    sweep_dir: Path,
    jobs: Sequence[CompareJob],
    missing: Sequence[JobRecord],
    arms: Sequence[str],
    arm_key: str = ARM_KEY,
) -> str:
    """The comparison as a document: budget, per-kind and extrapolation tables, validation loss."""
    from picomaml.eval.study import t_quantile

    rows = compare_rows(jobs, arms)
    seeds = sorted({j.seed for j in jobs}, key=sort_key)
    n = len(seeds)
    first = jobs[0].final
    lines = [
        f"# Attention comparison: {sweep_dir}",
        "",
        f"{len(jobs)} jobs with a numeric evaluation; arms {arm_key} = {', '.join(arms)} (baseline "
        f"{arms[0]}); seeds {', '.join(seeds)}. Trained on documents of at most L = "
        f"{first.get('numeric/train_terms', float('nan')):.0f} terms; the continuation predicts the last "
        f"{first.get('numeric/continuation_terms', float('nan')):.0f} terms of each sequence.",
        "",
        "Each cell is the mean over seeds ± the half-width of its 95% t interval "
        f"(t(0.975, n-1){f' = {t_quantile(n - 1):.3f} for n = {n}' if n > 1 else ''}). The paired "
        "column is the difference per seed, then averaged, with its interval [low, high]; **bold** when the "
        "interval excludes 0. *step 0* (when scored) is the run's own random init. *all* averages the kinds "
        "scored at every length (geometric sequences are at most 12 terms long, so it leaves them out when "
        "a length is longer).",
        "",
        "## Token budget",
        "",
    ]
    budget = []
    for arm in arms:
        members = [j for j in jobs if j.arm == arm]
        tokens = [float(j.record.tokens_seen) for j in members if j.record.tokens_seen is not None]
        steps = [float(j.record.global_step) for j in members if j.record.global_step is not None]
        walls = [j.record.wall_time_s for j in members if j.record.wall_time_s is not None]
        params = next((j.final.get("n_params") for j in members if j.final.get("n_params")), None)
        budget.append(
            [
                arm,
                str(len(members)),
                f"{params:,.0f}" if params else "",
                _range(steps, "{:.0f}"),
                _range(tokens, "{:,.0f}"),
                _range(walls, "{:.0f}"),
            ]
        )
    lines += _md_table(["arm", "jobs", "parameters", "steps", "tokens_seen", "wall s"], budget)
    for metric in ("token_acc", "exact"):
        lines += ["", f"## {NUMERIC_METRICS[metric].capitalize()} by kind and length ↑", ""]
        lines += _metric_table(jobs, rows, arms, metric)
    loss = {(r.checkpoint, r.arm): r.estimate for r in rows if r.key == "loss"}
    if loss:
        lines += ["", "## Validation loss (nats/token, documents of at most L terms) ↓", ""]
        control = any(checkpoint == "step0" for checkpoint, _ in loss)
        header = [
            *arms,
            *(f"{a} - {arms[0]} (paired)" for a in arms[1:]),
            *(["step 0 (init)"] if control else []),
        ]
        line = [format_estimate(loss.get(("final", a))) for a in arms]
        line += [format_estimate(loss.get(("final", f"{a} - {arms[0]}")), interval=True) for a in arms[1:]]
        if control:
            line.append(
                format_estimate(next((loss[("step0", a)] for a in arms if ("step0", a) in loss), None))
            )
        lines += _md_table(header, [line])
    if missing:
        lines += ["", "## Jobs without a numeric evaluation", ""]
        lines += _md_table(
            ["job", "status", "overrides"], [[str(r.job), r.status, " ".join(r.overrides)] for r in missing]
        )
    return "\n".join(lines) + "\n"


def _range(values: Sequence[float], fmt: str) -> str:
    if not values:
        return ""
    mean = fmt.format(statistics.fmean(values))
    return (
        mean
        if min(values) == max(values)
        else f"{mean} ({fmt.format(min(values))}-{fmt.format(max(values))})"
    )


def write_csv(path: Path, rows: Sequence[CompareRow]) -> None:
    """One line per estimate: key, checkpoint, arm, n, mean, ci95 (half-width), low, high."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "checkpoint", "arm", "n", "mean", "ci95", "low", "high"])
        for r in rows:
            e = r.estimate
            extra = ("" if v is None else v for v in (e.half_width, e.low, e.high))
            writer.writerow([r.key, r.checkpoint, r.arm, e.n, e.mean, *extra])


def loss_curves(jobs: Sequence[CompareJob], arm: str, key: str) -> list[tuple[int, Estimate]]:
    """``key`` of the arm's jobs against the step: mean and 95% CI over the seeds logged at that step."""
    by_step: dict[int, list[float]] = {}
    for job in jobs:
        if job.arm == arm:
            for step, value in job.metrics.get(key, []):
                by_step.setdefault(step, []).append(value)
    return [(step, mean_ci(values)) for step, values in sorted(by_step.items())]


def plot_loss_curves(jobs: Sequence[CompareJob], arms: Sequence[str], path: Path) -> bool:
    """Training loss (arm mean with its 95% band, seeds thin) and validation loss (markers) of every arm
    on one figure; False when no job logged a loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_key = next((k for k in TRAIN_LOSS_KEYS if any(j.metrics.get(k) for j in jobs)), None)
    has_val = any(j.metrics.get("val/loss") for j in jobs)
    if train_key is None and not has_val:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, arm in enumerate(arms):
        color = f"C{i % 10}"
        if train_key is not None:
            for job in (j for j in jobs if j.arm == arm and j.metrics.get(train_key)):
                steps, values = zip(*job.metrics[train_key], strict=True)
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            points = loss_curves(jobs, arm, train_key)
            steps = [s for s, _ in points]
            means = [e.mean for _, e in points]
            half = [e.half_width or 0.0 for _, e in points]
            ax.plot(steps, means, color=color, linewidth=2, label=f"{arm}: {train_key} (mean over seeds)")
            low = [m - h for m, h in zip(means, half, strict=True)]
            high = [m + h for m, h in zip(means, half, strict=True)]
            ax.fill_between(steps, low, high, color=color, alpha=0.15)
        val = loss_curves(jobs, arm, "val/loss")
        if val:
            ax.errorbar(
                [s for s, _ in val],
                [e.mean for _, e in val],
                yerr=[e.half_width or 0.0 for _, e in val],
                color=color,
                marker="o",
                linestyle=":",
                capsize=3,
                label=f"{arm}: val/loss",
            )
    ax.set(xlabel="optimizer step (equal tokens per step in every arm)", ylabel="loss (nats/token)")
    ax.set_yscale("log")
    ax.set_title(f"{len(jobs)} jobs: loss by arm (bands: 95% CI over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_compare(
    sweep_dir: Path, out: Path | None = None, arm_key: str = ARM_KEY, baseline: str | None = None
) -> dict[str, Path]:
    """Writes ``numeric.md``, ``numeric.csv`` and ``numeric_loss_curves.png`` into ``out`` (default the
    sweep dir); returns their paths by name."""
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    jobs, missing = collect_compare(sweep_dir, arm_key)
    if not jobs:
        raise FileNotFoundError(
            f"no job under {sweep_dir} has numeric scores in {FINAL_EVAL_FILE}: is it an "
            "experiment=attention_compare sweep (callbacks.final_eval.suite with numeric)?"
        )
    arms = arms_in_order(jobs, baseline)
    written = {"md": out / "numeric.md", "csv": out / "numeric.csv"}
    written["md"].write_text(markdown_report(sweep_dir, jobs, missing, arms, arm_key))
    write_csv(written["csv"], compare_rows(jobs, arms))
    if plot_loss_curves(jobs, arms, out / "numeric_loss_curves.png"):
        written["loss_curves"] = out / "numeric_loss_curves.png"
    return written


def scores_of(jobs: Sequence[CompareJob], key: str, arm: str, checkpoint: str = "final") -> dict[str, Any]:
    """``{seed: value}`` of one score of one arm (what the paired statistics read; tests use it)."""
    return {
        j.seed: getattr(j, checkpoint)[key] for j in jobs if j.arm == arm and key in getattr(j, checkpoint)
    }
