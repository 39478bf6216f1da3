"""Structured config of the ``picomaml_optuna`` Hydra sweeper (``hydra/sweeper=picomaml_optuna``).

Importing this module registers the config in Hydra's ConfigStore; the plugin shim in
``hydra_plugins/picomaml_sweeper`` imports it during Hydra's plugin scan, so it must stay light
(no optuna import here: the scan runs at the start of every Hydra app, single runs included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

SWEEPER_TARGET = "hydra_plugins.picomaml_sweeper.PicomamlOptunaSweeper"


@dataclass
class SamplerConf:
    """Which optuna sampler proposes the next trial's parameters.

    ``tpe`` (default) models good and bad regions; ``constant_liar`` makes it avoid proposing points
    next to trials that are still running, which matters with asynchronous parallel trials.
    ``random`` ignores history; ``grid`` enumerates ``choice``/``range`` params exhaustively
    (``n_trials`` is capped at the grid size); ``cmaes`` needs the ``cmaes`` package and only
    handles ``interval``/``range`` params (choices fall back to random sampling).
    Multi-objective studies (``directions``): ``tpe`` (MOTPE), ``nsga2`` (NSGA-II, a genetic
    algorithm: generations of ``population_size`` trials), ``random`` and ``grid``; not ``cmaes``.
    """

    name: str = "tpe"
    seed: int | None = None
    # nsga2 only: trials per generation
    population_size: int = 50
    # tpe and cmaes: random trials before the model kicks in
    n_startup_trials: int = 10
    # tpe only
    multivariate: bool = False
    constant_liar: bool = True


@dataclass
class PrunerConf:
    """Which optuna pruner stops unpromising trials from their intermediate values.

    Pruning only happens if the task reports values (``picomaml.sweep.trial_reporter``).
    ``none``: never prune. ``median``: prune a trial whose best value so far is worse than the median
    of the other trials at the same step (after ``n_startup_trials`` finished trials and
    ``n_warmup_steps`` steps). ``successive_halving`` / ``hyperband``: keep the top
    1/``reduction_factor`` at each rung of ``min_resource * reduction_factor**k`` steps.
    Options that do not belong to the chosen pruner are ignored.
    """

    name: str = "none"
    # median
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1
    # successive_halving and hyperband: steps of the first rung; "auto" infers it from the first
    # finished trial (successive_halving) or means 1 (hyperband)
    min_resource: Any = "auto"
    reduction_factor: int = 3
    # successive_halving
    min_early_stopping_rate: int = 0
    # hyperband: an int, or "auto" (the largest step reported by the first finished trial)
    max_resource: Any = "auto"


@dataclass
class PicomamlOptunaSweeperConf:
    """``hydra.sweeper`` when ``hydra/sweeper=picomaml_optuna``.

    ``params`` maps config keys (or config groups) to Hydra override-grammar search spaces:
    ``interval(0,1)`` (float), ``tag(log, interval(1e-4,1e-2))`` (log scale),
    ``tag(int, interval(1,8))`` (int), ``range(1,6)`` (int steps, end excluded as in Python),
    ``choice(a,b)`` (categorical; also config groups: ``model: choice(11m,65m)``). A plain value
    (``seed: 1``) is a fixed override for every trial, as are plain overrides on the command line.

    ``storage`` defaults to ``sqlite:///<sweep dir>/optuna.db``; any SQLAlchemy URL
    (``postgresql://...``) or ``journal:<path>`` (optuna's file journal, for trials on many nodes
    sharing a filesystem) works too. Re-running the same command with the same ``hydra.sweep.dir``
    (Hydra's default has a timestamp: pass it explicitly) and ``study_name`` resumes the study up to
    ``n_trials`` trials in total.
    """

    _target_: str = SWEEPER_TARGET
    study_name: str = "picomaml"
    storage: str | None = None
    # one objective: minimize (the default when neither is set) or maximize `optimized_metric`
    direction: str | None = None
    # several objectives, exclusive with `direction`: one direction per key of a list
    # `optimized_metric` (e.g. [minimize, maximize] for [val/loss, meta_test/query_acc]); the study
    # keeps the Pareto front, cannot prune, and best.yaml lists the front's trials
    directions: list[str] | None = None
    # trials in the study in total (finished, pruned and failed), across resumes
    n_trials: int = 20
    # trials running at once; a new one starts as soon as any finishes (schedule=async)
    parallelism: int = 1
    # async: a new trial as soon as any of the `parallelism` running ones ends (one submission per
    # trial). batch: hydra-optuna-sweeper's blocking batches, `parallelism` trials in one launch (one
    # SLURM job array per batch) awaited together before the next batch is asked: fewer submissions,
    # but each batch lasts as long as its slowest trial, and a job that dies fails its whole batch.
    schedule: str = "async"
    # stop submitting once this many trials failed in this run (a study that fails everywhere)
    max_failures: int = 10
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    params: dict[str, Any] = field(default_factory=dict)
    # parameter sets to try first, e.g. [{meta.inner_lr: 0.1, optim.lr: 3e-4}] (known good settings);
    # one already in the study is not enqueued again on resume
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    # write optuna plots (HTML and PNG) to <sweep dir>/plots when the sweep ends
    plots: bool = True
    # GB one trial may use (per node: every local process on the CPU, one GPU on CUDA); a trial whose
    # predicted peak (picomaml.lit.memory) is higher is not launched and ends with status over_budget
    # ("predicts 31.2 GB > budget 24 GB"); null: no budget. See picomaml.sweep.memory_budget.
    memory_budget_gb: float | None = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="picomaml_optuna", node=PicomamlOptunaSweeperConf, provider="picomaml"
)
