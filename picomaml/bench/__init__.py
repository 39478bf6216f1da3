"""Benchmarks, as ``python -m picomaml.bench <name> key=value ...`` (``--help`` after a name lists its keys).

- ``train``: steady-state pretraining steps: tokens/s, model FLOPs, MFU against the measured matmul peak.
- ``meta``: a MAML step against an AR step over the same rows and tokens.
- ``sweep``: an optuna study's per-trial overheads, asynchronous trials vs blocking batches.
- ``downstream``: few-shot scoring of a model on the real labelled tasks (encoding vs adaptation time).
- ``memory``: predicted (picomaml.lit.memory) vs measured peak memory of real training runs.

Each writes JSON (``out=``) and prints it. Performance is measured here, never by timed tests.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from picomaml.bench.downstream import bench_downstream
from picomaml.bench.memory import bench_memory
from picomaml.bench.meta import bench_meta
from picomaml.bench.sweep import bench_sweep
from picomaml.bench.train import bench_train

COMMANDS: dict[str, Callable[[list[str]], dict[str, object]]] = {
    "train": bench_train,
    "meta": bench_meta,
    "sweep": bench_sweep,
    "downstream": bench_downstream,
    "memory": bench_memory,
}


def main(argv: list[str] | None = None) -> dict[str, object]:
    """``python -m picomaml.bench <name> key=value ...``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        raise SystemExit(f"usage: python -m picomaml.bench {{{','.join(COMMANDS)}}} key=value ... (--help)")
    return COMMANDS[argv[0]](argv[1:])
