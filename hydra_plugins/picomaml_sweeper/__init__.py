"""Hydra discovery shim for picomaml's optuna sweeper (``hydra/sweeper=picomaml_optuna``).

Hydra finds plugins by importing every module of the ``hydra_plugins`` namespace package (which has no
``__init__.py`` of its own, so installed plugins share it) and only instantiates plugin classes
defined there. The class below is that plugin; the work happens in
``picomaml.sweep.optuna_sweeper``, imported when a sweep actually starts, so that the plugin scan at
the start of every Hydra app stays cheap.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

import picomaml.sweep.config  # noqa: F401  (registers hydra/sweeper=picomaml_optuna)


class PicomamlOptunaSweeper(Sweeper):
    """Asynchronous optuna sweeps with pruning, failure isolation and resume.

    Configured by ``picomaml.sweep.config.PicomamlOptunaSweeperConf``.
    """

    def __init__(self, **kwargs: Any) -> None:
        from picomaml.sweep.optuna_sweeper import OptunaSweeperImpl

        self.impl = OptunaSweeperImpl(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.impl.sweep(arguments)
