"""The ``picomaml_optuna`` Hydra sweeper: asynchronous optuna trials with pruning, failure isolation
and resume, launched through any Hydra launcher (submitit_local, slurm, basic).

How a sweep runs:

* ``schedule=async`` (default): every trial is one ``launcher.launch([overrides],
  initial_job_idx=trial.number)`` call, so its job dir is ``<sweep dir>/<trial number>`` (Hydra's
  ``hydra.sweep.subdir`` is ``${hydra.job.num}``) and a trial number is never reused, resumed sweeps
  included. Launchers block until their jobs end, so each call waits in its own thread; up to
  ``parallelism`` trials run at once and a new one is asked from the study as soon as any finishes
  (no batch barrier: a slow trial holds one slot, not all of them). The basic launcher runs jobs
  inside the driver process (working directory, logging, signal handlers), so with it trials run one
  after another in the main thread.
* ``schedule=batch``: hydra-optuna-sweeper's way. ``parallelism`` trials are asked, launched in one
  ``launcher.launch`` call (one SLURM job array, one submission) and waited for together before the
  next batch is asked: fewer submissions, but every batch lasts as long as its slowest trial, and a
  job that dies (killed, node failure) fails its whole batch, because the launcher then returns no
  result for any of its jobs.
* An enqueued value that the param's distribution cannot hold (not a choice, not positive on a log
  scale, not a number) fails that trial before anything is launched, with the key, the value and
  the allowed values in its ``error`` attribute; a number outside an interval is run as given.
* All optuna calls of the driver (ask, tell, attributes) happen on the main thread. Trials write
  only their intermediate values, from their own processes (``picomaml.sweep.trial_reporter``).
* A trial ends COMPLETE with a finite float return value; PRUNED when the task raised
  ``optuna.TrialPruned``; FAIL when it raised anything else, returned NaN/inf/a non-number, or its job
  died (a killed SLURM job surfaces as a submitit error). The study goes on; ``max_failures`` failures
  in one run stop new submissions and the sweep ends with an error once the running trials finish.
* Resume: rerunning the command with the same ``hydra.sweep.dir`` and study finds the study in the
  storage, marks trials left RUNNING by a killed driver as FAIL, and runs only
  ``n_trials - (finished + pruned + failed)`` new trials. One driver per study: a second driver would
  see the first one's running trials as stale.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from picomaml.sweep import results
from picomaml.sweep.cluster import check_launcher
from picomaml.sweep.memory_budget import MemoryBudget, is_oom_error, record_oom
from picomaml.sweep.objectives import check_pruner, check_returned, metric_names, resolve_directions
from picomaml.sweep.reporter import SWEEP_KEY
from picomaml.sweep.space import (
    SearchSpace,
    check_value,
    describe,
    encode_value,
    grid_of,
    parse_search_space,
    probe_overrides,
    suggest,
)
from picomaml.sweep.study import (
    PRUNER_ATTR,
    build_pruner,
    build_sampler,
    open_storage,
    resolve_storage_url,
)

if TYPE_CHECKING:
    import optuna
    from hydra.plugins.launcher import Launcher

log = logging.getLogger(__name__)

SCHEDULES = ("async", "batch")


class SweepConfigError(CompactHydraException, ValueError):
    """A sweep that cannot start: reported before any trial is submitted.

    Hydra prints a ``CompactHydraException`` as its message alone, without a traceback
    (``HYDRA_FULL_ERROR=1`` shows it).
    """


class TooManyFailuresError(CompactHydraException, RuntimeError):
    """``max_failures`` trials failed in one run: the sweep stopped submitting."""


@dataclass
class _Outcome:
    """What came back from one trial's launch call (on a worker thread)."""

    number: int
    job_return: JobReturn | None
    error: BaseException | None
    submitted_at: float
    returned_at: float


def _plain(node: Any, default: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else (node or default)


class OptunaSweeperImpl:
    """The sweeper behind ``hydra_plugins.picomaml_sweeper.PicomamlOptunaSweeper``.

    Arguments are the fields of ``picomaml.sweep.config.PicomamlOptunaSweeperConf``.
    """

    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str | None,
        n_trials: int,
        parallelism: int,
        max_failures: int,
        sampler: DictConfig,
        pruner: DictConfig,
        params: DictConfig | None,
        enqueue: Any,
        plots: bool,
        schedule: str = "async",
        directions: Any = None,
        memory_budget_gb: float | None = None,
    ) -> None:
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.directions_conf: list[str] | None = _plain(directions, None)
        # the study's directions, one per objective, and the task's metric keys: set by _check_objectives
        self.directions: list[str] = []
        self.metric_names: list[str] | None = None
        self.n_trials = n_trials
        self.parallelism = parallelism
        self.max_failures = max_failures
        # plain dicts: the pruner config is stored in the study for trials to read back
        self.sampler_conf: dict[str, Any] = _plain(sampler, {})
        self.pruner_conf: dict[str, Any] = _plain(pruner, {})
        self.params: dict[str, Any] = _plain(params, {})
        self.enqueue: list[dict[str, Any]] = _plain(enqueue, [])
        self.plots = plots
        self.schedule = schedule
        # trials predicted over this many GB are not launched (picomaml.sweep.memory_budget)
        self.memory_budget_gb = memory_budget_gb
        self.memory_budget: MemoryBudget | None = None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Called by Hydra before ``sweep``: keeps the config and instantiates the launcher."""
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ----------------------------------------------------------------------------------------------
    # checks that run before anything is submitted

    def _check_settings(self) -> None:
        if self.n_trials < 1:
            raise SweepConfigError(f"hydra.sweeper.n_trials must be >= 1, got {self.n_trials}")
        if self.parallelism < 1:
            raise SweepConfigError(f"hydra.sweeper.parallelism must be >= 1, got {self.parallelism}")
        if self.max_failures < 1:
            raise SweepConfigError(f"hydra.sweeper.max_failures must be >= 1, got {self.max_failures}")
        self._check_objectives()
        if self.schedule not in SCHEDULES:
            raise SweepConfigError(
                f"hydra.sweeper.schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if self.memory_budget_gb is not None:
            try:
                self.memory_budget = MemoryBudget(self.memory_budget_gb)
            except ValueError as e:
                raise SweepConfigError(str(e)) from e

    def _check_objectives(self) -> None:
        """``direction`` or ``directions`` against the task's ``optimized_metric`` and the pruner."""
        assert self.config is not None
        optimized_metric = OmegaConf.select(self.config, "optimized_metric", default=None)
        try:
            self.directions = resolve_directions(self.direction, self.directions_conf, optimized_metric)
            check_pruner(self.pruner_conf.get("name", "none"), self.directions)
        except ValueError as e:
            raise SweepConfigError(str(e)) from e
        # axis labels of the plots and column names of trials.csv: the metric keys when the task has them
        self.metric_names = metric_names(optimized_metric) if optimized_metric is not None else None

    def _check_enqueue(self, space: SearchSpace) -> None:
        if not isinstance(self.enqueue, list):
            raise SweepConfigError(f"hydra.sweeper.enqueue must be a list of dicts, got {self.enqueue!r}")
        for i, params in enumerate(self.enqueue):
            if not isinstance(params, dict):
                raise SweepConfigError(
                    f"hydra.sweeper.enqueue[{i}] must be a dict of searched keys, got {params!r}"
                )
            unknown = sorted(set(params) - set(space.distributions))
            if unknown:
                raise SweepConfigError(
                    f"hydra.sweeper.enqueue[{i}] sets {unknown}, which are not searched params "
                    f"(searched: {sorted(space.distributions)}); a value fixed for every trial belongs "
                    "in hydra.sweeper.params or on the command line"
                )

    def _search_space(self, arguments: list[str]) -> SearchSpace:
        try:
            space = parse_search_space(self.params, arguments)
        except Exception as e:
            raise SweepConfigError(
                f"bad search space in hydra.sweeper.params or the command line: {e}"
            ) from e
        if not space.distributions:
            raise SweepConfigError(
                "nothing to search: give hydra.sweeper.params (e.g. x: interval(0,1)) or a sweep override "
                "on the command line"
            )
        assert self.hydra_context is not None and self.config is not None
        # compose the way every trial will, so a misspelt key or missing group option fails here
        for overrides in probe_overrides(space):
            try:
                self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            except Exception as e:
                raise SweepConfigError(
                    f"the search space does not compose with the config ({' '.join(overrides)}): {e}"
                ) from e
        return space

    def _check_stored_objectives(self, study: optuna.Study, storage_url: str) -> None:
        """A resumed study keeps the directions it was created with: they must be the ones asked for.

        A multi-objective study also keeps its metric names (``optimized_metric``), which label the
        plots, ``trials.csv`` and ``best.yaml``.
        """
        stored = [d.name.lower() for d in study.directions]
        if stored != self.directions:
            created = stored[0] if len(stored) == 1 else stored
            asked = self.directions[0] if len(self.directions) == 1 else self.directions
            raise SweepConfigError(
                f"study {self.study_name!r} in {storage_url} was created to {created}, not {asked}; "
                "use another study_name (or hydra.sweep.dir)"
            )
        if len(stored) == 1 or self.metric_names is None or len(self.metric_names) != len(stored):
            return  # single-objective studies stay as they were (unnamed, any metric on resume)
        named = results.stored_metric_names(study)
        if named is not None and named != self.metric_names:
            raise SweepConfigError(
                f"study {self.study_name!r} in {storage_url} optimizes {named}, not {self.metric_names} "
                "(optimized_metric); use another study_name (or hydra.sweep.dir)"
            )
        results.set_metric_names(study, self.metric_names)

    def _check_trial_dirs(self, study: optuna.Study, sweep_dir: Path, storage_url: str) -> None:
        # numbered job dirs that the study does not know come from another study or a deleted
        # storage: new trials would reuse their numbers and write into them
        known = {t.number for t in study.trials}
        strays = sorted(
            int(p.name)
            for p in sweep_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) not in known
        )
        if strays:
            raise SweepConfigError(
                f"{sweep_dir} holds trial dirs {strays[:5]} that study {self.study_name!r} in {storage_url} "
                "does not know; new trials would write into them. "
                "Use a new hydra.sweep.dir, or the storage and study_name that made them."
            )

    # ----------------------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        """Runs the study; returns one ``[JobReturn]`` batch per trial launched in this run.

        ``best.yaml``, ``trials.csv`` and ``plots/`` are written to the sweep dir.
        """
        import optuna

        assert self.config is not None and self.launcher is not None
        self._check_settings()
        space = self._search_space(arguments)
        self._check_enqueue(space)
        check_launcher(self.launcher)
        try:
            grid = grid_of(space) if self.sampler_conf["name"] == "grid" else None
            sampler = build_sampler(self.sampler_conf, grid, n_objectives=len(self.directions))
            pruner = build_pruner(self.pruner_conf)
        except ValueError as e:
            raise SweepConfigError(str(e)) from e
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage_url = resolve_storage_url(self.storage, sweep_dir)
        try:
            storage = open_storage(storage_url)
        except ValueError as e:
            raise SweepConfigError(str(e)) from e

        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            directions=self.directions,
            load_if_exists=True,
        )
        self._check_stored_objectives(study, storage_url)
        self._check_trial_dirs(study, sweep_dir, storage_url)
        study.set_user_attr(PRUNER_ATTR, self.pruner_conf)
        self._fail_stale_trials(study)
        for params in self.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)

        n_trials = self.n_trials
        if grid is not None:
            n_trials = min(n_trials, math.prod(len(v) for v in grid.values()))
        done = sum(1 for t in study.trials if t.state.is_finished())
        todo = max(0, n_trials - done)
        log.info(
            f"study {self.study_name!r} in {storage_url}: {done} trials done, {todo} to run "
            f"(n_trials={n_trials}, parallelism={self.parallelism}, schedule={self.schedule}), "
            f"sweep dir {sweep_dir}"
        )
        run = self._run_batches if self.schedule == "batch" else self._run
        try:
            returns = run(study, space, storage_url, sweep_dir, todo)
        finally:
            self._write_results(study, sweep_dir, plots=self.plots)
        return returns

    def _write_results(self, study: optuna.Study, sweep_dir: Path, plots: bool) -> None:
        results.write_trials_csv(study, sweep_dir / "trials.csv")
        results.write_best(study, sweep_dir / "best.yaml")
        if plots:
            written = results.write_plots(study, sweep_dir / "plots")
            log.info(f"wrote {sweep_dir / 'best.yaml'}, trials.csv and {len(written)} plots")

    def _fail_stale_trials(self, study: optuna.Study) -> None:
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning(f"trial {t.number} was left RUNNING by an earlier driver: marking it FAIL")
            study.tell(t.number, state=TrialState.FAIL)

    def _ask(self, study: optuna.Study, space: SearchSpace, sweep_dir: Path) -> optuna.Trial | None:
        """A new trial with every searched param set; ``None`` when its enqueued values cannot be used.

        Such a trial (an enqueued ``-1`` for a log-scale param, a value that is not a choice) is
        marked FAIL at once, with the key, the value and the allowed values in its ``error``
        attribute; optuna would raise inside ``study.ask`` and leave it RUNNING.
        """
        from optuna.trial import TrialState

        trial = study.ask()
        # what enqueue_trial stored for this trial (optuna keeps it as the "fixed_params" attribute)
        (frozen,) = (t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        fixed = frozen.system_attrs.get("fixed_params", {})
        errors = []
        for name, dist in space.distributions.items():
            if name not in fixed:
                continue
            error, in_range = check_value(dist, fixed[name])
            allowed = f"{space.sources[name]}: {describe(dist)}"
            if error is not None:
                errors.append(f"enqueued {name}={fixed[name]!r} is not allowed by {allowed} ({error})")
            elif not in_range:
                log.warning(
                    f"trial {trial.number}: enqueued {name}={fixed[name]!r} is outside {allowed}; "
                    "running it as given"
                )
        if errors:
            message = "; ".join(errors)
            trial.set_user_attr(results.ERROR_ATTR, message[:2000])
            study.tell(trial, state=TrialState.FAIL)
            log.error(f"trial {trial.number} failed before launch: {message}")
            self._write_results(study, sweep_dir, plots=False)
            return None
        try:
            for name, dist in space.distributions.items():
                suggest(trial, name, dist)
        except BaseException as e:
            trial.set_user_attr(results.ERROR_ATTR, f"sampling failed: {type(e).__name__}: {e}"[:2000])
            study.tell(trial, state=TrialState.FAIL)
            raise

        # over the memory budget: told to the study (and its sampler) and never launched
        def compose() -> DictConfig:  # the trial's config, as its job will compose it
            assert self.hydra_context is not None and self.config is not None
            overrides = space.overrides(trial.params)
            return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

        if self.memory_budget is not None and not self.memory_budget.admit(study, trial, compose):
            self._write_results(study, sweep_dir, plots=False)
            return None
        return trial

    def _trial_overrides(self, trial: optuna.Trial, space: SearchSpace, storage_url: str) -> list[str]:
        user = space.overrides(trial.params)
        trial.set_user_attr(results.OVERRIDES_ATTR, user)
        log.info(f"trial {trial.number} started: {' '.join(user)}")
        # the reporter's coordinates; `++` adds the keys when the task config does not declare them
        return user + [
            f"++{SWEEP_KEY}.trial_number={trial.number}",
            f"++{SWEEP_KEY}.study_name={encode_value(self.study_name)}",
            f"++{SWEEP_KEY}.storage={encode_value(storage_url)}",
        ]

    def _launch(self, number: int, overrides: list[str], done: queue.Queue[_Outcome]) -> None:
        assert self.launcher is not None
        submitted = time.time()
        try:
            (job_return,) = self.launcher.launch([overrides], initial_job_idx=number)
            outcome = _Outcome(number, job_return, None, submitted, time.time())
        except Exception as e:  # the job died (killed, node failure, requeue limit): this trial fails alone
            outcome = _Outcome(number, None, e, submitted, time.time())
        done.put(outcome)

    def _fail_running(self, study: optuna.Study, running: dict[int, optuna.Trial]) -> None:
        from optuna.trial import TrialState

        for trial in running.values():
            trial.set_user_attr(results.ERROR_ATTR, "driver stopped while the trial ran")
            study.tell(trial, state=TrialState.FAIL)

    def _finish(self, failures: int, returns: dict[int, JobReturn]) -> list[list[JobReturn]]:
        if failures >= self.max_failures:
            raise TooManyFailuresError(
                f"{failures} trials failed in this run (max_failures={self.max_failures}): stopped the "
                "study; see the errors in trials.csv and the trial dirs"
            )
        return [[returns[n]] for n in sorted(returns)]

    def _run(
        self, study: optuna.Study, space: SearchSpace, storage_url: str, sweep_dir: Path, todo: int
    ) -> list[list[JobReturn]]:
        """``schedule=async``: a new trial as soon as one of the ``parallelism`` running ones ends."""
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        in_process = isinstance(self.launcher, BasicLauncher)
        if in_process and self.parallelism > 1:
            log.info("the basic launcher runs jobs inside the driver: trials run one at a time")
        slots = 1 if in_process else self.parallelism
        done: queue.Queue[_Outcome] = queue.Queue()
        running: dict[int, optuna.Trial] = {}
        returns: dict[int, JobReturn] = {}
        started = failures = 0
        try:
            while True:
                while len(running) < slots and started < todo and failures < self.max_failures:
                    trial = self._ask(study, space, sweep_dir)
                    started += 1
                    if trial is None:
                        failures += 1
                        continue
                    overrides = self._trial_overrides(trial, space, storage_url)
                    running[trial.number] = trial
                    if in_process:
                        self._launch(trial.number, overrides, done)
                    else:
                        # daemon: a driver stopped with Ctrl-C exits without waiting for its jobs
                        args = (trial.number, overrides, done)
                        threading.Thread(target=self._launch, args=args, daemon=True).start()
                if not running:
                    break
                outcome = done.get()
                failures += self._record(study, running.pop(outcome.number), outcome, returns)
                self._write_results(study, sweep_dir, plots=False)
        except BaseException:
            self._fail_running(study, running)
            raise
        return self._finish(failures, returns)

    def _run_batches(
        self, study: optuna.Study, space: SearchSpace, storage_url: str, sweep_dir: Path, todo: int
    ) -> list[list[JobReturn]]:
        """``schedule=batch``: ``parallelism`` trials in one launch call, all awaited before the next.

        Hydra numbers the jobs of one call ``initial_job_idx, initial_job_idx + 1, ...``, so a batch
        holds consecutive trial numbers only: a trial after a gap (one that failed before launch)
        waits for the next batch.
        """
        assert self.launcher is not None
        running: dict[int, optuna.Trial] = {}
        returns: dict[int, JobReturn] = {}
        started = failures = 0
        carried: optuna.Trial | None = None
        try:
            while carried is not None or (started < todo and failures < self.max_failures):
                batch = [carried] if carried is not None else []
                carried = None
                while len(batch) < self.parallelism and started < todo and failures < self.max_failures:
                    trial = self._ask(study, space, sweep_dir)
                    started += 1
                    if trial is None:
                        failures += 1
                        continue
                    running[trial.number] = trial
                    if batch and trial.number != batch[-1].number + 1:
                        carried = trial
                        break
                    batch.append(trial)
                if not batch:
                    continue
                overrides = [self._trial_overrides(t, space, storage_url) for t in batch]
                log.info(f"batch of trials {[t.number for t in batch]}: one launch, waiting for all of them")
                submitted = time.time()
                try:
                    job_returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
                    returned = time.time()
                    outcomes = [
                        _Outcome(t.number, jr, None, submitted, returned)
                        for t, jr in zip(batch, job_returns, strict=True)
                    ]
                except Exception as e:  # a job of the batch died: the launcher gives no result for any
                    returned = time.time()
                    outcomes = [_Outcome(t.number, None, e, submitted, returned) for t in batch]
                for outcome in outcomes:
                    failures += self._record(study, running.pop(outcome.number), outcome, returns)
                self._write_results(study, sweep_dir, plots=False)
        except BaseException:
            self._fail_running(study, running)
            raise
        return self._finish(failures, returns)

    def _record(
        self, study: optuna.Study, trial: optuna.Trial, outcome: _Outcome, returns: dict[int, JobReturn]
    ) -> bool:
        """Tells the study how ``trial`` ended and keeps its job return; True when it failed."""
        if outcome.job_return is not None:
            returns[outcome.number] = outcome.job_return
        return self._tell(study, trial, outcome) == "FAIL"

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: _Outcome) -> str:
        """Records the trial's end in the study; returns the state name."""
        import optuna
        from optuna.trial import TrialState

        trial.set_user_attr(results.SUBMITTED_ATTR, outcome.submitted_at)
        trial.set_user_attr(results.RETURNED_ATTR, outcome.returned_at)
        values: list[float] | None = None
        error: str | None = None
        if outcome.job_return is None:
            error = f"job died: {type(outcome.error).__name__}: {outcome.error}"
        else:
            try:
                # re-raises the task's exception, which Hydra's run_job stored in the JobReturn
                raw = outcome.job_return.return_value
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                log.info(f"trial {trial.number} pruned")
                return "PRUNED"
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            else:
                # a finite number, or one per objective in a multi-objective study
                values, error = check_returned(raw, len(self.directions))
        if error is not None and is_oom_error(error):
            return record_oom(study, trial, error)  # fails alone; the sampler learns the region
        if error is not None:
            trial.set_user_attr(results.ERROR_ATTR, error[:2000])
            study.tell(trial, state=TrialState.FAIL)
            log.error(f"trial {trial.number} failed: {error.splitlines()[0]}")
            return "FAIL"
        assert values is not None
        study.tell(trial, values if len(values) > 1 else values[0])
        log.info(f"trial {trial.number} finished: {values if len(values) > 1 else values[0]}")
        return "COMPLETE"
