"""What a sweep optimizes: one metric and a direction, or several metrics and one direction each.

A single-objective sweep reads ``optimized_metric: val/loss`` and ``hydra.sweeper.direction``; a
multi-objective one reads a list of metric keys and ``hydra.sweeper.directions`` of the same length::

    optimized_metric: [val/loss, meta_test/query_acc]
    hydra:
      sweeper:
        directions: [minimize, maximize]

The task (``picomaml.train``) then returns the values in that order and optuna keeps the trials that
no other trial beats on every objective at once: the Pareto front (``study.best_trials``).

Everything here is plain Python (no optuna import): the Hydra plugin scan and every training job
import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import ListConfig, OmegaConf

DIRECTIONS = ("minimize", "maximize")
# optuna's Trial.report and Trial.should_prune raise NotImplementedError in multi-objective studies
NO_PRUNING = (
    "pruning is not available for multi-objective studies in optuna; "
    "set hydra.sweeper.pruner.name=none or use one direction"
)


class MissingMetricError(ValueError):
    """The run ended without logging a metric it was asked to return (a typo in ``optimized_metric``,
    or a meta-test metric of a run without meta-learning)."""


def metric_names(optimized_metric: Any) -> list[str]:
    """``optimized_metric`` (one key or a list of keys, a plain value or an OmegaConf node) as a list."""
    if isinstance(optimized_metric, ListConfig):
        optimized_metric = OmegaConf.to_container(optimized_metric, resolve=True)
    if isinstance(optimized_metric, (list, tuple)):
        return [str(name) for name in optimized_metric]
    return [str(optimized_metric)]


def is_multi_objective(optimized_metric: Any) -> bool:
    """True when ``optimized_metric`` is a list of keys (even of one key: the task returns a list)."""
    return isinstance(optimized_metric, (list, tuple, ListConfig))


def objective_values(optimized_metric: Any, metrics: Mapping[str, float]) -> float | None | list[float]:
    """What the task returns to the sweeper: the value of ``optimized_metric`` among ``metrics``.

    One key: its value, or ``None`` when the run did not log it (the sweeper fails such a trial with
    "returned None"). A list of keys: their values in that order; a key the run did not log raises
    ``MissingMetricError`` naming it and the keys the run did log.
    """
    if not is_multi_objective(optimized_metric):
        return metrics.get(str(optimized_metric))
    names = metric_names(optimized_metric)
    missing = [name for name in names if name not in metrics]
    if missing:
        raise MissingMetricError(
            f"optimized_metric {names}: the run logged no {', '.join(missing)}; it logged {sorted(metrics)}"
        )
    return [float(metrics[name]) for name in names]


def resolve_directions(
    direction: str | None, directions: Sequence[str] | None, optimized_metric: Any = None
) -> list[str]:
    """The study's directions from ``hydra.sweeper.direction`` / ``directions``; raises ``ValueError``.

    ``direction`` and ``directions`` exclude each other; neither means ``[minimize]``. When the task
    config has an ``optimized_metric``, its number of keys must equal the number of directions (a
    single key and a single direction, or a list of n keys and n directions).
    """
    if direction is not None and directions is not None:
        raise ValueError(
            f"hydra.sweeper.direction={direction} and hydra.sweeper.directions={list(directions)} "
            "exclude each other: set directions for a multi-objective study (and "
            "hydra.sweeper.direction=null), or direction alone"
        )
    if directions is None:
        resolved = [direction or "minimize"]
        key = "hydra.sweeper.direction"
    else:
        resolved = [str(d) for d in directions]
        key = "hydra.sweeper.directions"
        if not resolved:
            raise ValueError("hydra.sweeper.directions is empty: give one direction per optimized_metric key")
    bad = [d for d in resolved if d not in DIRECTIONS]
    if bad:
        each = " (each)" if directions is not None else ""
        raise ValueError(f"{key} must be one of {DIRECTIONS}{each}, got {bad[0]!r}")
    if optimized_metric is not None:
        names = metric_names(optimized_metric)
        if len(names) != len(resolved) or (directions is None and is_multi_objective(optimized_metric)):
            raise ValueError(
                f"optimized_metric {names if is_multi_objective(optimized_metric) else names[0]!r} "
                f"has {len(names)} key(s) but {key} gives {len(resolved)} direction(s) {resolved}: "
                "give hydra.sweeper.directions with one direction per key (a list optimized_metric "
                "needs directions, a single key needs direction)"
            )
    return resolved


def check_pruner(pruner_name: str, directions: Sequence[str]) -> None:
    """Raises ``ValueError`` when a pruner is asked for a multi-objective study (optuna cannot prune it)."""
    if len(directions) > 1 and pruner_name != "none":
        raise ValueError(
            f"hydra.sweeper.pruner.name={pruner_name} with directions={list(directions)}: {NO_PRUNING}"
        )


def check_returned(raw: Any, n_objectives: int) -> tuple[list[float] | None, str | None]:
    """A task's return value as ``n_objectives`` finite floats, or ``(None, why not)``.

    One objective takes a number (or a list of one: ``optimized_metric=[val/loss]``); several take a
    list or tuple of that many numbers.
    """
    sequence = isinstance(raw, (list, tuple, ListConfig))
    if n_objectives == 1 and not (sequence and len(raw) == 1):
        items = [raw]
    elif sequence and len(raw) == n_objectives:
        items = list(raw)
    else:
        return None, f"returned {raw!r}, not a list of {n_objectives} numbers (one per direction)"
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            return None, f"returned {raw!r}, not a number" + ("" if n_objectives == 1 else f": {item!r}")
        if not math.isfinite(value):
            return None, f"returned {value if n_objectives == 1 else list(items)}"
        values.append(value)
    return values, None
