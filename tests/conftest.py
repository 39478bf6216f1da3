"""Shared fixtures: a session-wide token cache, the tiny real runs, the SLURM cluster.

Plain helpers (composed configs, run settings, waits) are in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Tests never touch the network; wandb stays off unless a test turns it on. Set before picomaml (and so
# huggingface_hub, which reads HF_HUB_OFFLINE once at import) is imported.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from picomaml.config import register_bases, register_resolvers  # noqa: E402
from picomaml.train import CONFIG_SCHEMAS  # noqa: E402
from tests.helpers import KIT, controller_up, tiny_sweep  # noqa: E402

torch.set_num_threads(2)
register_resolvers()
register_bases(CONFIG_SCHEMAS)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenized-corpus cache for the whole session (the wiki packs once, in a few seconds)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """Two tiny real runs (``tests.helpers.tiny_sweep``) that evaluate/generate/analyze tests read."""
    root = tmp_path_factory.getbasetemp() / "tiny_runs"
    root.mkdir(exist_ok=True)
    return tiny_sweep(root, cache_dir)


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    """The cluster that answers, or the local one started here and stopped at the end."""
    if controller_up():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster answers and starting the local one needs root")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no SLURM cluster answers and the local one needs apt-get (Debian/Ubuntu) to install")
    proc = subprocess.run(["bash", str(KIT), "start"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    subprocess.run(["bash", str(KIT), "stop"], capture_output=True, text=True, timeout=120)
