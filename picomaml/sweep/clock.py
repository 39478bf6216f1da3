"""Wall-clock marks of one trial, for measuring what a sweep costs beyond the training itself.

``StepClock(out_dir)`` writes ``<out_dir>/step_clock.json`` with

* ``process_start``: when the trial's process was created (from ``/proc``; on SLURM that is the
  ``python -m submitit...`` process of the job step, so ``process_start - submitted_at`` is the time
  spent in sbatch, the scheduler and the job's start-up),
* ``first_step``: when the first training step began, ``last_step``: when the last one ended,
* ``steps``: steps seen so far.

The file is rewritten after every step (a few hundred bytes), so a trial that is pruned, killed or
fails still leaves its last marks. ``picomaml.bench.sweep.TrialClock`` is the Lightning callback
around it; the sweep test app (``tests/sweep_app``) uses it directly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

CLOCK_FILE = "step_clock.json"


def process_start_time(pid: int | None = None) -> float | None:
    """Unix time at which process ``pid`` (default: this one) started, to ~10 ms; ``None`` off Linux.

    ``/proc/<pid>/stat`` gives the start in clock ticks since boot and ``/proc/uptime`` the time since
    boot now, both finer than the whole seconds of the boot time that ``psutil`` adds.
    """
    try:
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        now = time.time()
    except OSError:
        return None
    # the command name (field 2) may hold spaces: fields after it follow the closing parenthesis
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return now - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class StepClock:
    """Marks the first step's start and every step's end in ``<out_dir>/step_clock.json``."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / CLOCK_FILE
        self.marks: dict[str, Any] = {
            "process_start": process_start_time(),
            "first_step": None,
            "last_step": None,
            "steps": 0,
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }

    def step_start(self) -> None:
        if self.marks["first_step"] is None:
            self.marks["first_step"] = time.time()
            self._write()

    def step_end(self) -> None:
        self.marks["last_step"] = time.time()
        self.marks["steps"] += 1
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.marks))
        tmp.replace(self.path)


def read_clock(job_dir: str | Path) -> dict[str, Any] | None:
    """The marks a trial left in ``job_dir``, or ``None`` if it never got to a training step."""
    path = Path(job_dir) / CLOCK_FILE
    return json.loads(path.read_text()) if path.exists() else None
