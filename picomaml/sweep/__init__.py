"""Hyperparameter sweeps: picomaml's optuna sweeper for Hydra and the trial-side reporting API.

``hydra/sweeper=picomaml_optuna`` (see ``picomaml.sweep.config``) runs optuna trials asynchronously
through any Hydra launcher; inside a trial, ``trial_reporter(cfg)`` reports intermediate values so
that pruners can stop bad trials early (see ``picomaml.sweep.reporter``).
"""

from picomaml.sweep.reporter import TrialReporter, trial_reporter

__all__ = ["TrialReporter", "trial_reporter"]
