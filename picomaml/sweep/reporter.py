"""The task side of pruning: report intermediate values of a trial and ask whether to stop it.

The ``picomaml_optuna`` sweeper launches every trial with three extra overrides (``++`` adds the keys
when the config does not declare them)::

    ++sweep.trial_number=<optuna trial number> ++sweep.study_name=<study> ++sweep.storage=<URL>

A training loop calls, at each validation::

    reporter = trial_reporter(cfg)            # once; inactive outside an optuna sweep
    reporter.report(step, val_loss)
    if reporter.should_prune():
        raise optuna.TrialPruned(f"pruned at step {step}")

The exception must leave the task function (Hydra records it in the job's return value); the
sweeper then marks the trial PRUNED. Outside a sweep, ``report`` does nothing and ``should_prune`` is
always false, so the calls can stay in the training loop unconditionally.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import optuna

# the config node the sweeper fills in for every trial
SWEEP_KEY = "sweep"


class TrialReporter:
    """Reports a trial's intermediate values to its optuna study and relays the pruner's verdict.

    Build it with ``trial_reporter(cfg)``. ``number`` is the optuna trial number (also the trial's
    job directory name under the sweep dir), ``None`` outside a sweep.
    """

    def __init__(self, number: int | None = None, study_name: str | None = None, storage: str | None = None):
        self.number = number
        self._trial: optuna.Trial | None = None
        # set when the study already closed this trial (a resumed driver marked it FAIL)
        self._orphaned = False
        # optuna keeps no intermediate values for a multi-objective study (and cannot prune it)
        self._multi_objective = False
        if number is None:
            return
        import optuna

        from picomaml.sweep.study import PRUNER_ATTR, build_pruner, open_storage

        backend = open_storage(storage or "", existing=True)
        study_id = backend.get_study_id_from_name(study_name or "")
        pruner_conf = backend.get_study_user_attrs(study_id).get(PRUNER_ATTR, {"name": "none"})
        study = optuna.load_study(study_name=study_name, storage=backend, pruner=build_pruner(pruner_conf))
        self._multi_objective = len(study.directions) > 1
        trial_id = backend.get_trial_id_from_study_id_trial_number(study_id, number)
        self._trial = optuna.Trial(study, trial_id)

    @property
    def active(self) -> bool:
        """True inside a trial of a ``picomaml_optuna`` sweep."""
        return self._trial is not None

    def report(self, step: int, value: float) -> None:
        """Records ``value`` (the optimized metric) at ``step`` for the pruner and the plots.

        A step reported twice (a requeued job redoing steps after resuming) keeps the first value;
        a NaN or infinite value is not stored (optuna cannot rank it) and is left to the final result.
        In a multi-objective study nothing is stored: optuna has no intermediate values there.
        """
        if self._trial is None or self._multi_objective or not math.isfinite(value):
            return
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            self._trial.report(float(value), int(step))
        except UpdateFinishedTrialError:
            self._orphaned = True

    def should_prune(self) -> bool:
        """Whether the study's pruner wants this trial stopped, given the values reported so far.

        Also true when the study has already closed the trial: its driver was killed and a rerun
        marked it FAIL, so nobody will record its result and the job should free its resources.
        """
        if self._trial is None:
            return False
        return self._orphaned or (not self._multi_objective and self._trial.should_prune())


def trial_reporter(cfg: DictConfig | dict[str, Any] | None = None) -> TrialReporter:
    """The reporter of the trial that ``cfg`` belongs to; an inactive one outside an optuna sweep.

    Reads ``cfg.sweep.trial_number``, ``cfg.sweep.study_name`` and ``cfg.sweep.storage``.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg or {})
    node = OmegaConf.select(cfg, SWEEP_KEY, default=None)
    if node is None or node.get("trial_number") is None:
        return TrialReporter()
    return TrialReporter(int(node.trial_number), str(node.study_name), str(node.storage))
