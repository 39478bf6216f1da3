"""The Pareto front of a finished (or running) multi-objective sweep, read back from its sweep dir.

The sweeper writes ``trials.csv`` with one ``values_<metric>`` column per objective and a ``pareto``
column, and ``best.yaml`` with the directions by metric name (``picomaml.sweep.results``). The report
(``python -m picomaml.report sweep_dir=...``) reads them here, without optuna or the study's storage,
so a copied sweep dir reports as well as the original.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VALUES_PREFIX = "values_"
PARAMS_PREFIX = "params_"


@dataclass
class FrontTrial:
    """One complete trial of a multi-objective study."""

    number: int
    values: list[float]
    pareto: bool
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Front:
    """Every complete trial of a multi-objective study, with its objectives' names and directions."""

    names: list[str]
    directions: list[str]
    trials: list[FrontTrial]

    @property
    def members(self) -> list[FrontTrial]:
        """The Pareto front, best first on the first objective."""
        sign = 1.0 if self.directions[0] != "maximize" else -1.0
        return sorted((t for t in self.trials if t.pareto), key=lambda t: (sign * t.values[0], t.number))

    def summary(self) -> str:
        """One sentence: how many of the complete trials are on the front, and what each objective wants."""
        wants = ", ".join(f"`{n}` {_arrow(d)}" for n, d in zip(self.names, self.directions, strict=True))
        return (
            f"{len(self.members)} of {len(self.trials)} complete trials are on the Pareto front ({wants}): "
            "no other trial is at least as good on every objective and better on one."
        )

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Header and rows of the front: trial number, one column per objective, then the params."""
        keys = list(dict.fromkeys(k for t in self.members for k in t.params))
        header = ["trial", *(f"{n} {_arrow(d)}" for n, d in zip(self.names, self.directions, strict=True))]
        rows = [[t.number, *t.values, *(t.params.get(k) for k in keys)] for t in self.members]
        return header + keys, rows


def _arrow(direction: str) -> str:
    return {"minimize": "↓", "maximize": "↑"}.get(direction, "")


def read_front(sweep_dir: Path) -> Front | None:
    """The front of the multi-objective sweep in ``sweep_dir``; None for any other sweep dir (no
    ``trials.csv``, or one without a ``pareto`` column: a single-objective study or a grid)."""
    path = sweep_dir / "trials.csv"
    if not path.exists():
        return None
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "pareto" not in columns:
        return None
    names = [c[len(VALUES_PREFIX) :] for c in columns if c.startswith(VALUES_PREFIX)]
    best = sweep_dir / "best.yaml"
    stored = (yaml.safe_load(best.read_text()) or {}).get("directions", {}) if best.exists() else {}
    directions = [str(stored.get(n, "?")) for n in names]
    trials = [
        FrontTrial(
            number=int(r["number"]),
            values=[float(r[VALUES_PREFIX + n]) for n in names],
            pareto=r["pareto"] == "True",
            params={c[len(PARAMS_PREFIX) :]: r[c] for c in columns if c.startswith(PARAMS_PREFIX) and r[c]},
        )
        for r in rows
        if r["state"] == "COMPLETE"
    ]
    return Front(names, directions, trials)


def plot_front(front: Front, path: Path) -> bool:
    """Every complete trial on the first two objectives, the front highlighted and joined in order;
    False (no file) with fewer than two objectives or no complete trial."""
    if len(front.names) < 2 or not front.trials:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    others = [t for t in front.trials if not t.pareto]
    ax.scatter([t.values[0] for t in others], [t.values[1] for t in others], color="0.6", label="trial")
    members = sorted(front.members, key=lambda t: t.values[0])
    xs, ys = [t.values[0] for t in members], [t.values[1] for t in members]
    ax.plot(xs, ys, color="tab:red", marker="o", label="Pareto front")
    for t in members:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(f"{front.names[0]} {_arrow(front.directions[0])}")
    ax.set_ylabel(f"{front.names[1]} {_arrow(front.directions[1])}")
    ax.set_title(f"{len(members)} of {len(front.trials)} trials on the front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
