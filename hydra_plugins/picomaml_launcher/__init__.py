"""``conf/hydra/launcher/slurm.yaml`` and ``slurm_local.yaml``'s launcher: hydra-submitit-launcher's SLURM
launcher that checks the cluster before it submits.

Before its first sbatch in a process (a grid multirun's first batch, or the optuna sweeper's check
before the first trial) it runs ``picomaml.sweep.cluster.prepare_slurm_params``: SLURM must answer
(``scontrol ping``), ``auto`` resources (``cpus_per_task``, ``mem_gb``) are sized from what ``sinfo``
reports for the target partition, and a request no node of that partition can hold (a GPU on a CPU
partition, more CPUs or memory than a node has) is one error naming the ``hydra.launcher`` key and
what the partition offers, instead of an sbatch refusal per job. Everything else is
hydra-submitit-launcher's ``SlurmLauncher``.

The config schema ``hydra/launcher=picomaml_slurm`` (``PicomamlSlurmQueueConf``) is
``submitit_slurm``'s with ``auto`` allowed for ``cpus_per_task`` and ``mem_gb``; both profiles build on it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class PicomamlSlurmLauncher(SlurmLauncher):
    """``SlurmLauncher`` that checks the cluster (reachable, resources) before its first submission."""

    _prepared = False

    def prepare(self) -> None:
        """Checks SLURM and the request and fills ``auto`` resources, once per launcher instance.

        The optuna sweeper calls it before its first trial (``picomaml.sweep.cluster.check_launcher``),
        so the per-trial ``launch`` calls that follow do not query the cluster again.
        """
        if self._prepared:
            return
        from picomaml.sweep.cluster import prepare_slurm_params

        self.params = prepare_slurm_params(self.params)
        self._prepared = True

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.prepare()
        return super().launch(job_overrides, initial_job_idx)


@dataclass
class PicomamlSlurmQueueConf(SlurmQueueConf):
    """``submitit_slurm``'s fields; ``cpus_per_task`` and ``mem_gb`` also take ``auto`` (sized from
    ``sinfo`` at launch: ``picomaml.sweep.cluster.fill_auto``)."""

    _target_: str = "hydra_plugins.picomaml_launcher.PicomamlSlurmLauncher"
    cpus_per_task: Any = None
    mem_gb: Any = None


ConfigStore.instance().store(
    group="hydra/launcher", name="picomaml_slurm", node=PicomamlSlurmQueueConf, provider="picomaml"
)
