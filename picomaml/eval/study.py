"""The AR-vs-hybrid study as numbers: every job of a sweep read back, compared across arms paired by seed.

``python -m picomaml.train experiment=ar_vs_hybrid`` runs a grid of model size x arm
(``meta.hybrid_ratio`` 0 = AR-only, > 0 = hybrid) x seed; each job dir holds::

    .hydra/overrides.yaml  .hydra/config.yaml     what the job was (model, meta.hybrid_ratio, seed)
    result.json                                   status, steps and tokens_seen (picomaml.train)
    csv/metrics.csv                               the logged curves (meta/meta_steps, ...)
    eval_results/final.json                       {"final": {...}, "step0": {...}}
                                                  (picomaml.lit.final_eval.FinalEvaluation)

:func:`collect` reads the job dirs of any sweep (``picomaml.report`` builds its table on it too);
:func:`collect_study` adds the arm, size, seed and final evaluation of each job, and
:func:`study_rows` turns them into one row per (model size, metric, checkpoint): the mean and 95%
confidence interval over seeds of each arm, and of the **paired** difference hybrid - AR.

Statistics. With seeds s = 1..n, each arm's value is a sample x_s; its interval is
mean +- t(0.975, n-1) * sd / sqrt(n). The arms of one seed share their random init, data order and
evaluation episodes, so the comparison is the paired one: d_s = hybrid_s - AR_s, and the interval of
mean(d) is mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n), which removes the seed-to-seed variance both arms
share. With a handful of seeds the t quantile matters: for n = 3 it is 4.30, not the normal 1.96
(which would claim intervals 2.2 times too narrow). :func:`t_quantile` takes it from
``scipy.stats.t.ppf`` when SciPy is installed (scikit-learn brings it), else from a table of the
two-sided 95% quantiles for df 1..30 and a Cornish-Fisher expansion beyond (error < 1e-3 there).
n = 1 gives a mean without an interval.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# overrides added by the optuna sweeper for the trial reporter; not hyperparameters
SWEEP_OVERRIDE = re.compile(r"^\+{0,2}sweep\.")
STEP_COLUMNS = ("step", "epoch")
FINAL_EVAL_FILE = Path("eval_results") / "final.json"
ARM_KEY = "meta.hybrid_ratio"

# ------------------------------------------------------------------------------- a sweep's job dirs


@dataclass
class JobRecord:
    """What the reports know about one job of a sweep."""

    job: int
    path: Path
    overrides: list[str]
    params: dict[str, str]
    status: str = "missing"
    metric: float | None = None
    wall_time_s: float | None = None
    tokens_seen: int | None = None
    global_step: int | None = None
    final: dict[str, float] = field(default_factory=dict)
    # (step, value) pairs of the learning-curve metric
    curve: list[tuple[float, float]] = field(default_factory=list)


def float_or_none(text: Any) -> float | None:
    """``text`` as a finite float, else None (empty CSV cells, ``nan``, non-numbers)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def sort_key(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order first, then other strings alphabetically."""
    number = float_or_none(value)
    return (0, number, value) if number is not None else (1, 0.0, value)


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
                    value = float_or_none(text)
                    if name and name not in STEP_COLUMNS and value is not None:
                        final[name] = value
                step, value = float_or_none(row.get("step")), float_or_none(row.get(metric))
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
    """Reads every job dir under ``sweep_dir`` (a dir holding ``.hydra/overrides.yaml``), by job number.

    A job without ``result.json`` (killed, still running) takes its status from the sweep's
    ``trials.csv`` when there is one (optuna sweeps), else ``missing``.
    """
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
            rec.metric = float_or_none(result.get("metric"))
            rec.wall_time_s = float_or_none(result.get("wall_time_s"))
            tokens, step = result.get("tokens_seen"), result.get("global_step")
            rec.tokens_seen = int(tokens) if tokens is not None else None
            rec.global_step = int(step) if step is not None else None
        elif number in states:
            rec.status = states[number]
        rec.final, rec.curve = _read_metrics(job_dir, metric)
        records.append(rec)
    return sorted(records, key=lambda r: r.job)


def group_value(rec: JobRecord, key: str) -> str:
    """The job's value of ``key``: its override, else the value in its composed ``.hydra/config.yaml``
    (``?`` when neither has it). Config groups (``model``) are only known from the overrides."""
    if key in rec.params:
        return rec.params[key]
    config = rec.path / ".hydra" / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.load(config), key, default=None)
        if value is not None:
            return str(value)
    return "?"


# ------------------------------------------------------------------------------------- statistics

# two-sided 95% quantiles t(0.975, df) of Student's t for df = 1..30 (scipy.stats.t.ppf, 4 decimals)
T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z975 = 1.959963984540054


def t_quantile(df: int) -> float:
    """t(0.975, df): half-width multiplier of a two-sided 95% interval with ``df`` degrees of freedom.

    SciPy's ``stats.t.ppf`` when SciPy imports; otherwise :data:`T975` for df <= 30 and, beyond, the
    Cornish-Fisher expansion z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2) around the
    normal quantile z = 1.96 (within 1e-3 of the exact value for df > 30).
    """
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1 (two or more samples), got df={df}")
    try:
        from scipy import stats
    except ImportError:
        return t_quantile_table(df)
    return float(stats.t.ppf(0.975, df))


def t_quantile_table(df: int) -> float:
    """The table / expansion half of :func:`t_quantile` (no SciPy needed)."""
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1 (two or more samples), got df={df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` samples and the half-width of its 95% t interval (None for n < 2)."""

    n: int
    mean: float
    half_width: float | None

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly on one side of 0 (for a difference: the arms differ at 95%)."""
        return self.half_width is not None and abs(self.mean) > self.half_width


def mean_ci(values: Sequence[float]) -> Estimate:
    """Mean of ``values`` and the half-width t(0.975, n-1) * sd / sqrt(n) of its 95% interval."""
    if not values:
        raise ValueError("mean_ci of no values")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Estimate(n, mean, None)
    return Estimate(n, mean, t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n))


def paired_difference(baseline: Mapping[Any, float], other: Mapping[Any, float]) -> Estimate | None:
    """``other - baseline`` paired by key (the seed): :func:`mean_ci` of the per-key differences.

    Keys present in only one of the two are left out; None when no key is in both.
    """
    shared = sorted(set(baseline) & set(other), key=str)
    if not shared:
        return None
    return mean_ci([other[k] - baseline[k] for k in shared])


# -------------------------------------------------------------------------------------- the study


@dataclass
class StudyJob:
    """One job of a study: which cell of the grid it is and what its final evaluation scored."""

    record: JobRecord
    model: str
    hybrid_ratio: float
    seed: str
    final: dict[str, float]
    step0: dict[str, float]

    @property
    def n_params(self) -> float | None:
        return self.final.get("n_params") or self.step0.get("n_params")


def scalar_scores(results: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of one scored checkpoint (per-episode lists, configs and labels dropped)."""
    return {
        k: float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def collect_study(sweep_dir: Path) -> tuple[list[StudyJob], list[JobRecord]]:
    """The jobs of a study sweep that have a final evaluation, and the jobs that have none (killed,
    failed, still running) so the report can list them."""
    jobs, missing = [], []
    for rec in collect(sweep_dir):
        path = rec.path / FINAL_EVAL_FILE
        ratio = float_or_none(group_value(rec, ARM_KEY))
        if not path.is_file() or ratio is None:
            missing.append(rec)
            continue
        scores = json.loads(path.read_text())
        jobs.append(
            StudyJob(
                record=rec,
                # a config group is only named in the overrides (the config holds its contents)
                model=rec.params.get("model", "default"),
                hybrid_ratio=ratio,
                seed=group_value(rec, "seed"),
                final=scalar_scores(scores.get("final", {})),
                step0=scalar_scores(scores.get("step0", {})),
            )
        )
    return jobs, missing


@dataclass(frozen=True)
class Metric:
    """A score the report shows: its key in the evaluation results and how to read it."""

    key: str
    label: str
    higher_is_better: bool
    # the TF-IDF floor does not depend on the model: one number per task and k, not an arm's result
    floor: bool = False


LM_METRICS = (
    Metric("loss", "val loss (nats/token)", False),
    Metric("ppl_token_weighted", "val perplexity (token-weighted)", False),
    Metric("ppl_doc_mean", "val perplexity (document mean)", False),
    Metric("top1_acc", "val next-token top-1 acc", True),
    Metric("meta_query_acc", "SMLMT meta-test acc (held-out words)", True),
)
_DOWNSTREAM = re.compile(r"^downstream/(?P<task>[^/]+)/k(?P<k>\d+)/(?P<scorer>.+)/acc$")


def headline_metrics(keys: Iterable[str]) -> list[Metric]:
    """The metrics of the report, in reading order, among the result ``keys``: LM and meta-test, then
    per downstream task and k: head-only (after its inner steps), full fine-tuning (the last scored
    step) and the TF-IDF floor."""
    keys = set(keys)
    metrics = [m for m in LM_METRICS if m.key in keys]
    finetune_last: dict[tuple[str, int], int] = {}
    cells: set[tuple[str, int]] = set()
    for key in keys:
        match = _DOWNSTREAM.match(key)
        if match is None:
            continue
        cell = (match["task"], int(match["k"]))
        cells.add(cell)
        if match["scorer"].startswith("finetune/step"):
            step = int(match["scorer"].removeprefix("finetune/step"))
            finetune_last[cell] = max(step, finetune_last.get(cell, -1))
    for task, k in sorted(cells):
        prefix = f"downstream/{task}/k{k}"
        candidates = [Metric(f"{prefix}/head/acc", f"{task} k={k}: head-only", True)]
        if (task, k) in finetune_last:
            steps = finetune_last[(task, k)]
            candidates.append(
                Metric(
                    f"{prefix}/finetune/step{steps}/acc",
                    f"{task} k={k}: full fine-tune ({steps} step{'' if steps == 1 else 's'})",
                    True,
                )
            )
        candidates.append(Metric(f"{prefix}/tfidf/acc", f"{task} k={k}: TF-IDF floor", True, floor=True))
        metrics += [m for m in candidates if m.key in keys]
    return metrics


@dataclass(frozen=True)
class StudyRow:
    """One cell of the report: a model size, a metric, which checkpoint and which arm (or the paired
    difference, ``arm = "diff"``), and the estimate over seeds."""

    model: str
    n_params: float | None
    metric: Metric
    checkpoint: str  # final | step0
    arm: str  # "ar", "hybrid", "diff" (hybrid - AR, paired by seed)
    hybrid_ratio: float | None
    estimate: Estimate


def arm_name(ratio: float) -> str:
    """``ar`` for hybrid_ratio 0, else ``hybrid`` (one hybrid ratio per study; see :func:`study_rows`)."""
    return "ar" if ratio == 0 else "hybrid"


def models_in_order(jobs: Sequence[StudyJob]) -> list[str]:
    """Model names by parameter count (names without a count last, alphabetically)."""
    params: dict[str, float] = {}
    for job in jobs:
        if job.n_params is not None:
            params[job.model] = job.n_params
    return sorted({j.model for j in jobs}, key=lambda m: (m not in params, params.get(m, 0.0), m))


def study_rows(jobs: Sequence[StudyJob]) -> list[StudyRow]:
    """Every estimate of the report: per model size, metric and checkpoint (final, step0), each arm's
    mean and 95% CI over seeds, and the paired difference hybrid - AR over the seeds both arms ran.

    A study compares one hybrid ratio against AR (ratio 0); with several nonzero ratios each is its own
    ``hybrid`` arm, told apart by ``hybrid_ratio``.
    """
    rows: list[StudyRow] = []
    for model in models_in_order(jobs):
        members = [j for j in jobs if j.model == model]
        n_params = next((j.n_params for j in members if j.n_params is not None), None)
        ratios = sorted({j.hybrid_ratio for j in members})
        for checkpoint in ("final", "step0"):
            keys = {k for j in members for k in getattr(j, checkpoint)}
            for metric in headline_metrics(keys):
                by_ratio: dict[float, dict[str, float]] = {}
                for j in members:
                    value = getattr(j, checkpoint).get(metric.key)
                    if value is not None and math.isfinite(value):
                        by_ratio.setdefault(j.hybrid_ratio, {})[j.seed] = value
                for ratio in ratios:
                    if ratio in by_ratio:
                        estimate = mean_ci(list(by_ratio[ratio].values()))
                        rows.append(
                            StudyRow(model, n_params, metric, checkpoint, arm_name(ratio), ratio, estimate)
                        )
                for ratio in ratios:
                    if ratio == 0 or 0.0 not in by_ratio or ratio not in by_ratio:
                        continue
                    diff = paired_difference(by_ratio[0.0], by_ratio[ratio])
                    if diff is not None:
                        rows.append(StudyRow(model, n_params, metric, checkpoint, "diff", ratio, diff))
    return rows


# ---------------------------------------------------------------------------------------- writing


def format_estimate(est: Estimate | None, interval: bool = False) -> str:
    """``mean ± half-width`` (``[low, high]`` too with ``interval``), all with the decimals that give
    the larger of |mean| and the half-width 4 significant digits, so a column reads at one precision."""
    if est is None:
        return ""
    scale = max(abs(est.mean), est.half_width or 0.0)
    decimals = 4 if scale < 1e-9 else min(6, max(0, 3 - math.floor(math.log10(scale))))
    if est.half_width is None:
        return f"{est.mean:.{decimals}f} (n=1)"
    text = f"{est.mean:.{decimals}f} ± {est.half_width:.{decimals}f}"
    if interval:
        text += f" [{est.low:.{decimals}f}, {est.high:.{decimals}f}]"
    return text


def _params_label(n: float | None) -> str:
    if n is None:
        return "? params"
    return f"{n / 1e6:.1f}M params" if n >= 1e5 else f"{n:.0f} params"


def budget_rows(jobs: Sequence[StudyJob]) -> list[list[str]]:
    """Per model and arm: jobs, optimizer steps, tokens seen and tokens per step (mean, and min-max
    over seeds when they differ), meta and AR steps, wall time: what each arm actually trained on."""
    out = []
    for model in models_in_order(jobs):
        for ratio in sorted({j.hybrid_ratio for j in jobs if j.model == model}):
            members = [_budget(j) for j in jobs if j.model == model and j.hybrid_ratio == ratio]
            row = [model, f"{arm_name(ratio)} (r={ratio:g})", str(len(members))]
            for key, fmt in (
                ("steps", "{:.0f}"),
                ("tokens_seen", "{:,.0f}"),
                ("tokens_per_step", "{:,.0f}"),
                ("meta_steps", "{:.0f}"),
                ("ar_steps", "{:.0f}"),
                ("wall_time_s", "{:.0f}"),
            ):
                row.append(_range([b[key] for b in members if b[key] is not None], fmt))
            out.append(row)
    return out


def _budget(job: StudyJob) -> dict[str, float | None]:
    """One job's training budget. Tokens and steps from result.json (what picomaml.train returned),
    else from the final checkpoint; meta/AR step counts from the final checkpoint, else the last
    logged ones."""
    tokens = job.record.tokens_seen if job.record.tokens_seen is not None else job.final.get("tokens_seen")
    steps = job.record.global_step or job.final.get("step")
    counts = {}
    for kind in ("meta", "ar"):
        value = job.final.get(f"{kind}_steps")
        counts[f"{kind}_steps"] = value if value is not None else job.record.final.get(f"meta/{kind}_steps")
    return {
        "steps": steps,
        "tokens_seen": tokens,
        "tokens_per_step": tokens / steps if tokens is not None and steps else None,
        "wall_time_s": job.record.wall_time_s,
        **counts,
    }


def _range(values: Sequence[float], fmt: str) -> str:
    if not values:
        return ""
    mean = fmt.format(statistics.fmean(values))
    if min(values) == max(values):
        return mean
    return f"{mean} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_report(sweep_dir: Path, jobs: Sequence[StudyJob], missing: Sequence[JobRecord]) -> str:
    """The study as a document a researcher reads: the token budget each arm really used, then per model
    size a table of every headline metric (arms, paired difference, step-0 control)."""
    rows = study_rows(jobs)
    seeds = sorted({j.seed for j in jobs}, key=sort_key)
    ratios = sorted({j.hybrid_ratio for j in jobs})
    t_n = len(seeds)
    lines = [
        f"# AR vs hybrid study: {sweep_dir}",
        "",
        f"{len(jobs)} jobs with a final evaluation; models {', '.join(models_in_order(jobs))}; "
        f"arms meta.hybrid_ratio {', '.join(f'{r:g}' for r in ratios)} (0 = AR-only); seeds "
        f"{', '.join(seeds)}.",
        "",
        "Each cell is the mean over seeds ± the half-width of its 95% t interval "
        f"(t(0.975, n-1){f' = {t_quantile(t_n - 1):.3f} for n = {t_n}' if t_n > 1 else ''}). "
        "**hybrid − AR** is the paired difference (per seed, then averaged), with its interval "
        "[low, high]; it is **bold** when the interval excludes 0. Arrows say which direction is better. "
        "*step 0* is the run's own step-0 checkpoint (the random init, the same weights in both arms of "
        "a seed): the control for what training added. The TF-IDF floor does not depend on the model.",
        "",
        "## Token budget",
        "",
        "Tokens seen count AR tokens and the real (unpadded) tokens of meta windows, so a hybrid arm shows "
        "fewer tokens than the AR arm for the same padded positions through the backbone.",
        "",
    ]
    settings = _final_eval_settings(jobs)
    if settings:
        lines[4:4] = [f"Evaluation (callbacks.final_eval): `{settings}`", ""]
    header = [
        "model",
        "arm",
        "jobs",
        "steps",
        "tokens_seen",
        "tokens/step",
        "meta steps",
        "AR steps",
        "wall s",
    ]
    lines += _md_table(header, budget_rows(jobs))
    for model in models_in_order(jobs):
        members = [r for r in rows if r.model == model]
        n_params = next((r.n_params for r in members), None)
        lines += ["", f"## {model} ({_params_label(n_params)})", ""]
        lines += _md_table(*_model_table(members, ratios))
        mismatch = _step0_mismatch(members)
        if mismatch:
            lines += [
                "",
                f"Warning: the arms' step-0 scores differ ({', '.join(mismatch)}): the arms did not "
                "start from the same weights, or the evaluation is not deterministic.",
            ]
    if missing:
        lines += ["", "## Jobs without a final evaluation", ""]
        lines += _md_table(
            ["job", "status", "overrides"], [[str(r.job), r.status, " ".join(r.overrides)] for r in missing]
        )
    return "\n".join(lines) + "\n"


def _final_eval_settings(jobs: Sequence[StudyJob]) -> str:
    """The first job's ``callbacks.final_eval`` section, one line of JSON ("" if it has none)."""
    config = jobs[0].record.path / ".hydra" / "config.yaml"
    if not config.is_file():
        return ""
    from omegaconf import OmegaConf

    section = OmegaConf.select(OmegaConf.load(config), "callbacks.final_eval", default=None)
    if section is None:
        return ""
    values = OmegaConf.to_container(section, resolve=False)
    values.pop("_target_", None)
    return json.dumps(values, separators=(", ", ": "))


def _model_table(rows: Sequence[StudyRow], ratios: Sequence[float]) -> tuple[list[str], list[list[str]]]:
    hybrid = [r for r in ratios if r != 0]
    header = ["metric"]
    if 0 in ratios:
        header.append("AR")
    header += [f"hybrid r={r:g}" for r in hybrid]
    header += [f"hybrid r={r:g} − AR (paired)" for r in hybrid if 0 in ratios]
    header.append("step 0 (init)")
    cells: dict[tuple[str, str, str, float | None], Estimate] = {
        (r.metric.key, r.checkpoint, r.arm, r.hybrid_ratio): r.estimate for r in rows
    }
    table = []
    for metric in dict.fromkeys(r.metric for r in rows if r.checkpoint == "final"):
        arrow = "↑" if metric.higher_is_better else "↓"
        line = [f"{metric.label} {arrow}" if not metric.floor else metric.label]
        if 0 in ratios:
            line.append(format_estimate(cells.get((metric.key, "final", "ar", 0.0))))
        line += [format_estimate(cells.get((metric.key, "final", "hybrid", r))) for r in hybrid]
        if metric.floor:  # no model in it: nothing to difference, no step-0 version
            table.append(line + ["—"] * (len(header) - len(line)))
            continue
        for r in hybrid if 0 in ratios else []:
            diff = cells.get((metric.key, "final", "diff", r))
            text = format_estimate(diff, interval=True)
            line.append(f"**{text}**" if diff is not None and diff.excludes_zero else text)
        # both arms share the step-0 weights: show the AR arm's (any arm's when there is no AR arm)
        step0 = [cells.get((metric.key, "step0", arm_name(r), r)) for r in ratios]
        line.append(format_estimate(next((e for e in step0 if e is not None), None)))
        table.append(line)
    return header, table


def _step0_mismatch(rows: Sequence[StudyRow]) -> list[str]:
    """Metrics whose step-0 paired difference is not (numerically) zero."""
    return [
        r.metric.label
        for r in rows
        if r.checkpoint == "step0" and r.arm == "diff" and not r.metric.floor and abs(r.estimate.mean) > 1e-6
    ]


def write_csv(path: Path, rows: Sequence[StudyRow]) -> None:
    """One line per estimate: model, n_params, metric key and label, checkpoint, arm, hybrid_ratio, n,
    mean, ci95 (half-width), low, high."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "model",
                "n_params",
                "metric",
                "label",
                "checkpoint",
                "arm",
                "hybrid_ratio",
                "n",
                "mean",
                "ci95",
                "low",
                "high",
            ]
        )
        for r in rows:
            e = r.estimate
            writer.writerow(
                [
                    r.model,
                    "" if r.n_params is None else int(r.n_params),
                    r.metric.key,
                    r.metric.label,
                    r.checkpoint,
                    r.arm,
                    r.hybrid_ratio,
                    e.n,
                    e.mean,
                    *("" if v is None else v for v in (e.half_width, e.low, e.high)),
                ]
            )


# ------------------------------------------------------------------------------------------ plots

ARM_COLORS = {"ar": "tab:blue", "hybrid": "tab:orange"}


def plot_scaling(rows: Sequence[StudyRow], path: Path) -> bool:
    """Each metric against parameter count (log x), both arms with 95% CI bars, the step-0 control
    dashed and the TF-IDF floor dotted; False when no model has a parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.n_params is not None]
    metrics = list(dict.fromkeys(r.metric for r in rows if r.checkpoint == "final" and not r.metric.floor))
    if not metrics:
        return False
    cols = min(4, len(metrics))
    n_rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.4 * n_rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for (checkpoint, arm, ratio), style in _series(rows, metric).items():
            points = sorted(
                (
                    (r.n_params, r.estimate)
                    for r in rows
                    if (r.metric, r.checkpoint, r.arm, r.hybrid_ratio) == (metric, checkpoint, arm, ratio)
                ),
                key=lambda p: p[0],
            )
            xs = [p for p, _ in points]
            ys = [e.mean for _, e in points]
            errs = [e.half_width or 0.0 for _, e in points]
            ax.errorbar(xs, ys, yerr=errs, capsize=3, marker="o", **style)
        floor = [
            r
            for r in rows
            if r.metric.floor
            and r.metric.key == _floor_key(metric)
            and r.checkpoint == "final"
            and r.arm != "diff"
        ]
        if floor:
            mean = statistics.fmean(r.estimate.mean for r in floor)
            ax.axhline(mean, color="gray", linestyle=":", label="TF-IDF floor")
        ax.set_xscale("log")
        ax.set_title(metric.label, fontsize=9)
        ax.set_xlabel("parameters")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _floor_key(metric: Metric) -> str | None:
    match = _DOWNSTREAM.match(metric.key)
    return f"downstream/{match['task']}/k{match['k']}/tfidf/acc" if match else None


def _series(rows: Sequence[StudyRow], metric: Metric) -> dict[tuple[str, str, float | None], dict[str, Any]]:
    """Plot styles of the arms (final checkpoints, solid) and of the step-0 control (gray, dashed),
    drawn once: both arms of a seed share their step-0 weights, so the AR arm's stands for both."""
    series: dict[tuple[str, str, float | None], dict[str, Any]] = {}
    arms = list(
        dict.fromkeys((r.arm, r.hybrid_ratio) for r in rows if r.metric == metric and r.arm != "diff")
    )
    for arm, ratio in arms:
        label = "AR" if arm == "ar" else f"hybrid r={ratio:g}"
        series[("final", arm, ratio)] = {"color": ARM_COLORS[arm], "label": label}
    control = [
        (a, r)
        for a, r in arms
        if any(
            x.metric == metric and x.checkpoint == "step0" and (x.arm, x.hybrid_ratio) == (a, r) for x in rows
        )
    ]
    if control:
        arm, ratio = min(control, key=lambda c: c[0] != "ar")
        series[("step0", arm, ratio)] = {"color": "gray", "linestyle": "--", "label": "step 0 (init)"}
    return series


_FINETUNE = re.compile(r"^downstream/(?P<task>[^/]+)/k(?P<k>\d+)/finetune/step(?P<step>\d+)/acc$")


def adaptation_curves(
    jobs: Sequence[StudyJob], checkpoint: str = "final"
) -> dict[tuple[str, int], dict[tuple[str, float], list[tuple[int, Estimate]]]]:
    """Per (task, k), per (model, arm ratio): accuracy after 0, 1, 2, ... full fine-tuning steps of the
    ``checkpoint`` (``final`` or ``step0``), as mean and 95% CI over seeds."""
    values: dict[tuple[str, int], dict[tuple[str, float], dict[int, list[float]]]] = {}
    for job in jobs:
        for key, value in getattr(job, checkpoint).items():
            match = _FINETUNE.match(key)
            if match is None:
                continue
            series = values.setdefault((match["task"], int(match["k"])), {}).setdefault(
                (job.model, job.hybrid_ratio), {}
            )
            series.setdefault(int(match["step"]), []).append(value)
    return {
        cell: {
            series: [(step, mean_ci(v)) for step, v in sorted(points.items())]
            for series, points in by_series.items()
        }
        for cell, by_series in sorted(values.items())
    }


def plot_adaptation(jobs: Sequence[StudyJob], path: Path) -> bool:
    """Downstream accuracy against full fine-tuning steps: one panel per (task, k) and model size, both
    arms with 95% CI bands, the step-0 checkpoint fine-tuned alike (gray dashed: what pretraining
    added) and the TF-IDF floor dotted; False when no job fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = adaptation_curves(jobs)
    if not curves:
        return False
    controls = adaptation_curves(jobs, "step0")
    models = models_in_order(jobs)
    fig, axes = plt.subplots(
        len(curves), len(models), figsize=(4.2 * len(models), 3.2 * len(curves)), squeeze=False
    )
    for row, ((task, k), by_series) in enumerate(curves.items()):
        floor_key = f"downstream/{task}/k{k}/tfidf/acc"
        floor = [j.final[floor_key] for j in jobs if floor_key in j.final]
        for col, model in enumerate(models):
            ax = axes[row][col]
            for (series_model, ratio), points in sorted(by_series.items()):
                if series_model == model:
                    arm = arm_name(ratio)
                    label = "AR" if arm == "ar" else f"hybrid r={ratio:g}"
                    _band(ax, points, color=ARM_COLORS[arm], label=label)
            # both arms' step-0 checkpoints are the same init: draw one of them
            control = [p for (m, _), p in sorted(controls.get((task, k), {}).items()) if m == model]
            if control:
                _band(ax, control[0], color="gray", linestyle="--", label="step 0 (init)")
            if floor:
                ax.axhline(statistics.fmean(floor), color="gray", linestyle=":", label="TF-IDF floor")
            ax.set_xscale("symlog", linthresh=1)
            steps = sorted({s for points in by_series.values() for s, _ in points})
            ax.set_xticks(steps, [str(s) for s in steps])
            ax.set_title(f"{model}: {task} k={k}", fontsize=9)
            ax.set_xlabel("fine-tuning steps")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _band(ax: Any, points: Sequence[tuple[int, Estimate]], **style: Any) -> None:
    """A curve of means with its 95% CI as a shaded band."""
    steps = [s for s, _ in points]
    means = [e.mean for _, e in points]
    half = [e.half_width or 0.0 for _, e in points]
    ax.plot(steps, means, marker="o", **style)
    low = [m - h for m, h in zip(means, half, strict=True)]
    high = [m + h for m, h in zip(means, half, strict=True)]
    ax.fill_between(steps, low, high, color=style["color"], alpha=0.15)


def write_study(sweep_dir: Path, out: Path | None = None) -> dict[str, Path]:
    """Writes ``study.md``, ``study.csv``, ``study_scaling.png`` and ``study_adaptation.png`` (the plots
    when there is something to draw) into ``out`` (default the sweep dir); returns their paths by name."""
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    jobs, missing = collect_study(sweep_dir)
    if not jobs:
        raise FileNotFoundError(
            f"no job under {sweep_dir} has {FINAL_EVAL_FILE} and a {ARM_KEY}: is it a study sweep "
            "(experiment=ar_vs_hybrid)?"
        )
    rows = study_rows(jobs)
    written = {"md": out / "study.md", "csv": out / "study.csv"}
    written["md"].write_text(markdown_report(sweep_dir, jobs, missing))
    write_csv(written["csv"], rows)
    if plot_scaling(rows, out / "study_scaling.png"):
        written["scaling"] = out / "study_scaling.png"
    if plot_adaptation(jobs, out / "study_adaptation.png"):
        written["adaptation"] = out / "study_adaptation.png"
    return written
