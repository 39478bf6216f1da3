"""Checkpoint files written atomically next to their destination, and read back without running code.

Lightning's own writer stages a checkpoint through an fsspec transaction, whose local file system puts
the temporary file in the system temp dir: a kill leaves multi-MB orphans in ``/tmp``, and a full
``/tmp`` fails a save even when the run dir has room. Here the temporary file sits beside the target
(same file system, so the rename is atomic), file and directory are fsynced before and after the
rename (a power cut cannot leave a renamed but empty file), and a failed write removes its temporary.
Loading uses ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain containers only,
so a planted pickle in a downloaded run dir cannot execute code.

A write that fails because the disk is full raises one ``OSError`` (errno ENOSPC) that names the file and
the space left, e.g. ``No space left writing <run>/checkpoints/step_200/checkpoint.ckpt (0.0 MB free on
/scratch)`` (:func:`explain_disk_full`): the libraries underneath say it in their own words or not at
all (torch raises ``RuntimeError: ... unexpected pos``, safetensors ``SafetensorError``), and none names
the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, rename it over ``path`` and
    fsync the directory. The temporary file is removed when anything fails; ``path`` is either its old
    content or the complete new one. A full disk raises :func:`disk_full_error` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # inside the try: the free space is measured while the partial temporary still takes its room
        with explain_disk_full(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            with open(tmp, "rb+") as file:
                os.fsync(file.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# Below this much free space a failed write is taken for a full disk whatever the library called it
# (torch's zip writer reports a short write as "unexpected pos", without errno).
NEARLY_FULL_BYTES = 1 << 20
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded")


@contextlib.contextmanager
def explain_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a write error inside the block that comes from a full disk as one ``OSError`` (errno
    ENOSPC) saying ``No space left writing <path> (<N> MB free on <mount point>)``, chained to the
    original. Any other error passes through unchanged, and so does one a nested block already
    explained (its path is the more precise)."""
    try:
        yield
    except Exception as err:
        if getattr(err, "disk_full", False) or not _is_disk_full(err, Path(path)):
            raise
        raise disk_full_error(path) from err


def disk_full_error(path: str | os.PathLike) -> OSError:
    """The ``OSError`` of :func:`explain_disk_full` for a failed write of ``path``."""
    where = _existing_ancestor(Path(path))
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MB free"
    except OSError:
        free = "free space unknown"
    # built from the message alone, so str() is the message; errno still says what happened
    error = OSError(f"No space left writing {path} ({free} on {_mount_point(where)})")
    error.errno = errno.ENOSPC
    error.disk_full = True
    return error


def _is_disk_full(err: Exception, path: Path) -> bool:
    if getattr(err, "errno", None) in _NO_SPACE_ERRNOS or any(w in str(err) for w in _NO_SPACE_WORDS):
        return True
    if not isinstance(err, (OSError, RuntimeError)):
        return False  # a bug in the writer, not a failed write
    try:
        return shutil.disk_usage(_existing_ancestor(path)).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
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
