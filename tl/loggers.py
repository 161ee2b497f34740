"""Lightning's CSVLogger, kept whole across a resume.

Lightning's CSV writer deletes `metrics.csv` when its folder is not empty ("Previous log files in this directory will
be deleted"): `ckpt_path=last|auto` into the same run directory (a SLURM requeue, a resume after Ctrl-C) lost every
row logged before it. Here the writer appends instead: the earlier rows stay, and a new column rewrites the file
with the union header (Lightning's own path for new keys). `overwrite=true` still starts the run's csv/ afresh
(`tl.rundir.clear_previous_run`).
"""

from __future__ import annotations

import csv

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(k for k in header if k)


class ResumableCSVLogger(CSVLogger):
    """`pytorch_lightning.loggers.CSVLogger` whose metrics.csv survives a resume (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
