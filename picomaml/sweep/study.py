"""Optuna storages, samplers and pruners built from the sweeper config.

Shared by the sweep driver and by trials (``picomaml.sweep.trial_reporter``): a trial opens the same
storage by URL and rebuilds the same pruner from the study's user attribute ``PRUNER_ATTR``, so a
pruning decision taken inside a SLURM job matches what the driver configured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

# study user attribute holding the pruner config (a plain dict), read by trials
PRUNER_ATTR = "picomaml.pruner"
JOURNAL_PREFIX = "journal:"
# seconds a SQLite writer waits for the lock: trials report into the same file concurrently
SQLITE_TIMEOUT_S = 60


def resolve_storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The storage URL with every file path made absolute, so jobs started elsewhere find it.

    ``None`` means ``sqlite:///<sweep_dir>/optuna.db``. Relative SQLite and journal paths are taken
    relative to the current directory, as the user typed them.
    """
    if storage is None:
        return f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    if storage.startswith(JOURNAL_PREFIX):
        return JOURNAL_PREFIX + str(Path(storage[len(JOURNAL_PREFIX) :]).resolve())
    sqlite = "sqlite:///"
    if storage.startswith(sqlite) and storage != sqlite and not storage.startswith(sqlite + "/"):
        path = storage[len(sqlite) :]
        if path != ":memory:":
            return sqlite + str(Path(path).resolve())
    return storage


def open_storage(url: str, existing: bool = False) -> BaseStorage:
    """Opens an optuna storage: ``journal:<path>`` or any SQLAlchemy URL.

    Raises ``ValueError`` naming the URL if it cannot be opened (unknown dialect, missing driver,
    unreachable server, unwritable file), so a bad URL fails before any trial is submitted.
    ``existing=True`` (trials: the driver has created and checked the tables) skips the schema
    check, which costs a trial about half a second of imports.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    try:
        if url.startswith(JOURNAL_PREFIX):
            path = Path(url[len(JOURNAL_PREFIX) :])
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        engine_kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
            if url.startswith("sqlite:////"):
                Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, skip_compatibility_check=existing, skip_table_creation=existing
        )
    except Exception as e:
        raise ValueError(
            f"cannot open optuna storage {url!r}: {type(e).__name__}: {e}\n"
            "Use an SQLAlchemy URL (sqlite:///path.db, postgresql://user@host/db) or journal:<path>."
        ) from e


def build_sampler(
    conf: Mapping[str, Any],
    grid: dict[str, list[Any]] | None = None,
    n_objectives: int = 1,
    constraints_func: Callable[[FrozenTrial], Sequence[float]] | None = None,
) -> BaseSampler:
    """The sampler named by ``conf['name']`` (see ``picomaml.sweep.config.SamplerConf``).

    ``grid`` is required for the grid sampler (``picomaml.sweep.space.grid_of``). ``n_objectives`` > 1
    (a multi-objective study) rules out ``cmaes``. ``constraints_func`` goes to the samplers that take
    one (tpe, nsga2): trials with a positive constraint value are infeasible and never on the front.
    """
    import optuna

    name, seed = conf["name"], conf.get("seed")
    if n_objectives > 1 and name == "cmaes":
        raise ValueError(
            "hydra.sweeper.sampler.name=cmaes cannot search several objectives (directions); "
            "choose one of tpe, nsga2, random, grid"
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=conf.get("population_size", 50), constraints_func=constraints_func
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=conf["n_startup_trials"],
            multivariate=conf["multivariate"],
            constant_liar=conf["constant_liar"],
            constraints_func=constraints_func,
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        assert grid is not None
        return _AskTellGridSampler(grid, seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=conf["n_startup_trials"])
    raise ValueError(f"unknown sampler {name!r}; choose one of tpe, nsga2, random, grid, cmaes")


def _AskTellGridSampler(grid: dict[str, list[Any]], seed: int | None) -> BaseSampler:  # noqa: N802
    """optuna's GridSampler without its ``study.stop()`` once every grid point has been asked: that call
    raises outside ``study.optimize``, and the sweeper asks and tells (it caps ``n_trials`` at the grid
    size itself), so the tell of the last grid point crashed the sweep."""
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        def after_trial(self, *args: Any, **kwargs: Any) -> None:
            pass

    return AskTellGridSampler(grid, seed=seed)


def build_pruner(conf: Mapping[str, Any]) -> BasePruner:
    """The pruner named by ``conf['name']`` (see ``picomaml.sweep.config.PrunerConf``)."""
    import optuna

    name = conf["name"]
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=conf["n_startup_trials"],
            n_warmup_steps=conf["n_warmup_steps"],
            interval_steps=conf["interval_steps"],
            n_min_trials=conf["n_min_trials"],
        )
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=conf["min_resource"],
            reduction_factor=conf["reduction_factor"],
            min_early_stopping_rate=conf["min_early_stopping_rate"],
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=conf["min_resource"] if conf["min_resource"] != "auto" else 1,
            max_resource=conf["max_resource"],
            reduction_factor=conf["reduction_factor"],
        )
    raise ValueError(f"unknown pruner {name!r}; choose one of none, median, successive_halving, hyperband")
