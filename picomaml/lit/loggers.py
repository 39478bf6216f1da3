"""A CSV logger that survives resumption.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts. A resumed run (a rerun of the
same command, a SLURM requeue) must instead keep the history up to the checkpoint it resumes from and drop
only the rows logged after it, which the resumed run logs again; the file then reads as one run.
"""

from __future__ import annotations

import csv
import logging
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from picomaml.runs import metrics_row_step

log = logging.getLogger(__name__)


class _ResumableWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_through_step: int | None) -> None:
        self._keep_through_step = keep_through_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        if self._keep_through_step is None:
            # A fresh run never reaches here: train.py refuses a used output dir without a checkpoint.
            raise FileExistsError(f"{self.metrics_file_path} exists and this run is not a resume")
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [
                row
                for row in reader
                if metrics_row_step(row) is not None and metrics_row_step(row) <= self._keep_through_step
            ]
        if not keys or "step" not in keys:
            log.warning("%s has no step column; starting it afresh", self.metrics_file_path)
            keys, rows = [], []
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)
        self.metrics_keys = keys


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics file is truncated to `resume_step` instead of deleted on resume."""

    resume_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(self.log_dir, self.resume_step)
        return self._experiment
