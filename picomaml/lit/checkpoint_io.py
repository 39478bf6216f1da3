"""Checkpoint files written atomically next to their destination, and read back without running code.

Lightning's own writer stages a checkpoint through an fsspec transaction, whose local file system puts
the temporary file in the system temp dir: a kill leaves multi-MB orphans in ``/tmp``, and a full
``/tmp`` fails a save even when the run dir has room. Here the temporary file sits beside the target
(same file system, so the rename is atomic), file and directory are fsynced before and after the
rename (a power cut cannot leave a renamed but empty file), and a failed write removes its temporary.
Loading uses ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain containers only,
so a planted pickle in a downloaded run dir cannot execute code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, rename it over ``path`` and
    fsync the directory. The temporary file is removed when anything fails; ``path`` is either its old
    content or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing through :func:`write_atomic` and loading with weights only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
