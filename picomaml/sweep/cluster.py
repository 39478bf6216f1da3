"""Is SLURM there? A check that runs before a sweep submits anything to it.

Without it, a sweep on ``hydra/launcher=slurm`` whose controller does not answer fails one trial after
another (each ``sbatch`` retries for ~10 s) or, for a grid multirun, ends in a submitit traceback; with
no readable ``slurm.conf``, ``sbatch`` even hangs for a minute before it gives up.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from hydra.errors import CompactHydraException

# `scontrol ping` answers in milliseconds when the controller is up and in about as long when its
# port is closed; without a readable slurm.conf it retries for ~60 s
PING_TIMEOUT_S = 20.0


class SlurmUnreachableError(CompactHydraException, RuntimeError):
    """SLURM cannot take jobs from this machine (not installed, controller down or unreachable).

    Hydra prints a ``CompactHydraException`` as its message alone, without a traceback.
    """


def check_slurm(timeout_s: float = PING_TIMEOUT_S) -> None:
    """Raises ``SlurmUnreachableError`` unless ``sbatch`` exists and ``scontrol ping`` finds a
    controller that is UP."""
    hint = (
        "Start the sweep where SLURM answers (a login node; `bash launchers/slurm_local_cluster.sh start` "
        "on a workstation), or pick another launcher (hydra/launcher=submitit_local)."
    )
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise SlurmUnreachableError(
            f"the SLURM launcher needs sbatch and scontrol, not on PATH here: nothing was submitted. {hint}"
        )
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmUnreachableError(
            f"the SLURM controller did not answer `scontrol ping` within {timeout_s:.0f} s: nothing was "
            f"submitted. {hint}"
        ) from None
    # a healthy cluster with a backup controller down still says "... is UP" for the primary
    if "is UP" not in proc.stdout:
        lines = [line.strip(" *") for line in (proc.stdout + proc.stderr).splitlines()]
        said = "; ".join(line for line in lines if line)[:500] or f"exit status {proc.returncode}"
        raise SlurmUnreachableError(
            f"the SLURM controller is not reachable (`scontrol ping`: {said}): nothing was submitted. {hint}"
        )


def check_launcher(launcher: Any) -> None:
    """``check_slurm()`` when ``launcher`` submits to SLURM (hydra-submitit-launcher's SLURM launcher
    or a subclass of it); nothing for any other launcher."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    if isinstance(launcher, SlurmLauncher):
        check_slurm()
