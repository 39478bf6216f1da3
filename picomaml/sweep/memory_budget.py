"""Memory-aware sweeps: ``hydra.sweeper.memory_budget_gb`` and trials that run out of memory.

Three things, kept here so the sweeper only calls in at two points (before a launch, after a return):

* **Over budget, not launched.** With ``memory_budget_gb`` set, each trial's config is composed as its
  job will compose it and its peak memory predicted (:func:`picomaml.lit.memory.predict_peak_memory`,
  per node: every local process on the CPU, one device on CUDA). A trial predicted over the budget is
  never launched; it ends with the reason ``predicts 31.2 GB > budget 24 GB`` in its ``error``
  attribute and ``status`` ``over_budget`` (both in ``trials.csv``).
* **Out of memory at run time.** A trial whose job raised ``torch.OutOfMemoryError`` (CUDA), ran out of
  CPU memory (``DefaultCPUAllocator: not enough memory``), or was killed by SLURM for going over its
  memory ends alone with ``status`` ``oom``; the study goes on. SLURM kills a job over its ``--mem``
  with cgroups (``OUT_OF_MEMORY``) or, without, with ``JobAcctGatherParams=OverMemoryKill`` (slurmstepd:
  "Exceeded job memory limit", sacct: FAILED); submitit's error quotes the job's stderr, where both say
  so (launchers/slurm_local_cluster.sh turns OverMemoryKill on).
* **The samplers are told.** Every launched trial carries the constraint ``memory_budget`` =
  predicted GB - budget (<= 0: feasible) before it runs, an over-budget trial the same (> 0), and an
  out-of-memory trial the constraint ``oom`` = 1 (optuna's ``Trial.set_constraint``, stored as the system
  attribute ``constraints:<name>``). TPE (single and multi-objective) puts trials with a positive
  constraint below every feasible one and stops proposing their region.

Why such trials end PRUNED in optuna rather than FAIL: every optuna sampler skips FAIL trials, so a
constraint stored on a FAIL trial is never read and TPE keeps proposing the region (measured with
optuna 5.0's TPE on a 1-D space whose lower half is over budget: 67 of 70 proposals after the startup
trials fell there with FAIL, 31 of 70 with a constrained PRUNED trial, the optimum sitting at the
boundary). PRUNED is the state optuna gives a trial that ended without a value and that samplers still
learn from; ``status`` and ``error`` say what happened. NSGA-II reads constraints of COMPLETE trials
only, so under ``sampler.name=nsga2`` over-budget trials are skipped but not learnt from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from picomaml.sweep.results import ERROR_ATTR, STATUS_ATTR
from picomaml.sweep.results import PREDICTED_MEMORY_ATTR as PREDICTED_ATTR

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

BUDGET_CONSTRAINT = "memory_budget"
OOM_CONSTRAINT = "oom"
OVER_BUDGET = "over_budget"
OOM = "oom"
# what an out-of-memory death looks like in the error a trial's job returns
_OOM_MARKERS = (
    "OutOfMemoryError",  # torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError)
    "CUDA out of memory",
    "DefaultCPUAllocator: not enough memory",
    "DefaultCPUAllocator: can't allocate memory",
    # SLURM's over-memory kills, as submitit's error for a job that left no result quotes them:
    "exceeded memory limit",  # slurmstepd, JobAcctGatherParams=OverMemoryKill: "StepId=.. exceeded
    "Exceeded job memory limit",  # memory limit (N > M), being killed", then "Exceeded job memory limit"
    "oom-kill event",  # slurmstepd, cgroup enforcement (the kernel's OOM killer in the job's cgroup)
    "OUT_OF_MEMORY",  # the job state sacct reports after a cgroup OOM kill
)


def is_oom_error(error: str) -> bool:
    """Whether a trial's error text (``"<ExceptionType>: <message>"``) is an out-of-memory death."""
    return any(marker in error for marker in _OOM_MARKERS)


class MemoryBudget:
    """``hydra.sweeper.memory_budget_gb``: predicts each trial's peak before launch and records the
    ones over budget (see the module docstring)."""

    def __init__(self, budget_gb: float) -> None:
        if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not budget_gb > 0:
            raise ValueError(
                f"hydra.sweeper.memory_budget_gb must be a positive number of GB (or null: no budget), "
                f"got {budget_gb!r}"
            )
        self.budget_gb = float(budget_gb)

    def admit(self, study: optuna.Study, trial: optuna.Trial, compose: Callable[[], DictConfig]) -> bool:
        """Predict ``trial``'s peak from its composed config; False (and the trial is told) when over.

        ``compose`` returns the trial's config as its job will see it. A config the memory model cannot
        read is launched anyway (the job will report what is wrong with it).
        """
        # imported here: the memory model needs torch, which a sweep without a budget never loads
        from picomaml.lit.memory import GB, format_budget_reason, predict_peak_memory

        try:
            estimate = predict_peak_memory(compose())
        except Exception as err:  # the job itself reports a bad config, with its own message
            log.warning(f"trial {trial.number}: no memory prediction ({type(err).__name__}: {err})")
            return True
        predicted = estimate.machine_bytes / GB
        trial.set_user_attr(PREDICTED_ATTR, round(predicted, 3))
        trial.set_constraint(BUDGET_CONSTRAINT, predicted - self.budget_gb)
        if predicted <= self.budget_gb:
            return True
        from optuna.trial import TrialState

        reason = format_budget_reason(predicted, self.budget_gb)
        trial.set_user_attr(ERROR_ATTR, reason)
        trial.set_user_attr(STATUS_ATTR, OVER_BUDGET)
        study.tell(trial, state=TrialState.PRUNED)
        log.warning(f"trial {trial.number} not launched: {reason} [{estimate.summary()}]")
        return False


def record_oom(study: optuna.Study, trial: optuna.Trial, error: str) -> str:
    """Tell the study that ``trial`` ran out of memory (status ``oom``, constraint ``oom`` = 1)."""
    from optuna.trial import TrialState

    # a killed job's error quotes its whole stderr: lead with the line that says why it died
    why = next((line.strip() for line in error.splitlines() if is_oom_error(line)), "")
    first = error.splitlines()[0] if error else ""
    trial.set_user_attr(ERROR_ATTR, (first if why in first else f"{why} | {first}")[:2000])
    trial.set_user_attr(STATUS_ATTR, OOM)
    trial.set_constraint(OOM_CONSTRAINT, 1.0)
    study.tell(trial, state=TrialState.PRUNED)
    log.error(f"trial {trial.number} ran out of memory: {why or first}")
    return "OOM"
