"""Logger fixes that Lightning does not ship (yet).

Lightning's CSV writer deletes an existing `metrics.csv` when a new writer object opens its folder, and forgets
the columns already on disk: that happens when a run resumes into the same folder (and a later phase's writer
opens the folder of an earlier one, e.g. a test-only run), so earlier metrics are lost or the next header change raises
`dict contains fields not in fieldnames`. This writer keeps the file and seeds its columns from the header.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricExperimentWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing metrics file: later phases of the same run append to it."""

    def save(self) -> None:
        # Another process (a spawned fit phase) may have added columns since this writer was created or pickled.
        if self.metrics and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                on_disk = next(csv.reader(file), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(on_disk))
        super().save()


class ContinuingCSVLogger(CSVLogger):
    """`CSVLogger` that appends to an existing metrics file instead of breaking on it."""

    @property
    def experiment(self) -> _FabricExperimentWriter:  # CSVLogger's own return type (its _experiment's)
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
