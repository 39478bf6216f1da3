"""``conf/hydra/launcher/slurm.yaml``'s launcher: hydra-submitit-launcher's SLURM launcher that checks
SLURM answers before it submits.

Grid multiruns (Hydra's basic sweeper) call ``launch`` once per batch; the first call runs
``picomaml.sweep.cluster.check_slurm`` (``scontrol ping``) so that an unreachable controller gives one
clear message instead of a submitit traceback (or a minute-long hang without a slurm.conf). Everything
else is hydra-submitit-launcher's ``SlurmLauncher``, configured by its ``submitit_slurm`` config.
"""

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class PicomamlSlurmLauncher(SlurmLauncher):
    """``SlurmLauncher`` with a reachability check before the first submission of a process."""

    _checked = False

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not self._checked:
            from picomaml.sweep.cluster import check_slurm

            check_slurm()
            self._checked = True
        return super().launch(job_overrides, initial_job_idx)
