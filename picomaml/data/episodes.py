"""SMLMT meta-batches served beside the AR micro-batches, in the same resumable global order.

A meta run's training loader yields ``{"ar": <AR micro-batch>, "meta": <meta-batch>}`` for every
micro-step: both streams advance together, and the LightningModule's hybrid schedule decides which of
the two (or both, in ``sum`` mode) the step trains on. Building the unused one costs a memory-mapped
slice or a few milliseconds of numpy, far less than a forward pass, and it keeps both streams simple
functions of the micro-step number: a resumed run continues both exactly, with any number of workers.

Meta-batch (episode) numbering: global micro-step m of rank r of W uses episode ``m * W + r``, so ranks
never train on the same tasks. Meta-test episodes for validation are numbered the same way from 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from picomaml.meta import MetaBatchDataset


class MetaEpisodes(IterableDataset):
    """This rank's meta-batches for global micro-steps ``start, start + 1, ...`` (round-robin over workers,
    like the AR micro-batches, so every ``num_workers`` yields the same sequence)."""

    def __init__(self, episodes: MetaBatchDataset, start: int, rank: int, world_size: int) -> None:
        self.episodes = episodes
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for m in itertools.count(self.start + worker, n_workers):
            batch = self.episodes[m * self.world_size + self.rank]
            batch["microbatch"] = torch.tensor(m, dtype=torch.long)
            yield batch


class HybridMicrobatches(IterableDataset):
    """Zips the AR micro-batch stream with the meta-batch stream: item m is ``{"ar": ..., "meta": ...}``."""

    def __init__(self, ar: IterableDataset, meta: MetaEpisodes) -> None:
        self.ar = ar
        self.meta = meta

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        for ar, meta in zip(self.ar, self.meta, strict=False):
            yield {"ar": ar, "meta": meta}


def meta_val_batches(
    episodes: MetaBatchDataset, n_episodes: int, rank: int, world_size: int
) -> list[dict[str, torch.Tensor]]:
    """The fixed meta-test meta-batches this rank scores at every validation."""
    return [episodes[v * world_size + rank] for v in range(n_episodes)]
