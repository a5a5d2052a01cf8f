"""The private Lightning attributes metadiff reads, where no public API gives the same: this file fails when a
Lightning release moves one, and pyproject.toml bounds `lightning` above the last release checked here.

- `DDPStrategy._start_method` (metadiff.run): whether a DDP strategy is Lightning's spawn launcher (each phase in
  fresh processes, only rank 0's parameters handed back), which the run loop refuses; the launcher classes that
  would tell are private too.
- `CSVLogger._experiment` / `._fs` and `ExperimentWriter._check_log_dir_exists` / `._fs` / `.metrics_keys` /
  `.metrics_file_path` (metadiff.loggers): the CSV writer that appends to an existing metrics file (its behaviour:
  tests/test_loggers.py).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies import DDPStrategy

from metadiff.utils.distributed import StageRanksDDPStrategy


def test_ddp_strategies_record_their_start_method() -> None:
    assert DDPStrategy()._start_method == "popen"
    assert DDPStrategy(start_method="spawn")._start_method == "spawn"
    assert StageRanksDDPStrategy()._start_method == "popen"  # its ranks are started by metadiff.run, not refused


def test_the_csv_writer_internals_the_continuing_logger_overrides_exist(tmp_path: Path) -> None:
    assert callable(ExperimentWriter._check_log_dir_exists)
    writer = ExperimentWriter(log_dir=str(tmp_path / "w"))
    assert hasattr(writer, "_fs") and isinstance(writer.metrics_keys, list)
    assert writer.metrics_file_path.endswith("metrics.csv")
