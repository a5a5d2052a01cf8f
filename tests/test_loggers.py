"""The CSV logger keeps earlier rows when a fresh writer (a spawned test phase, a resumed run) opens the file."""

from __future__ import annotations

import csv
from pathlib import Path

from metadiff.loggers import ContinuingCSVLogger


def test_second_writer_on_same_file_keeps_earlier_columns(tmp_path: Path) -> None:
    fit = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version=0)
    fit.log_metrics({"train/loss": 1.0, "val/acc": 0.5}, step=0)
    fit.save()
    test = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version=0)  # as after a ddp_spawn phase
    test.log_metrics({"test/acc": 0.7}, step=1)
    test.save()
    with open(Path(fit.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["train/loss"] for r in rows] == ["1.0", ""]
    assert [r["test/acc"] for r in rows] == ["", "0.7"]


def test_writer_created_before_another_process_wrote_keeps_its_columns(tmp_path: Path) -> None:
    main = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version=0)
    _ = main.experiment  # created in the launching process, before the spawned fit phase writes
    fit = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version=0)
    fit.log_metrics({"val/acc": 0.5}, step=0)
    fit.save()
    main.log_metrics({"test/acc": 0.7}, step=1)
    main.save()
    with open(Path(main.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["val/acc"], r["test/acc"]) for r in rows] == [("0.5", ""), ("", "0.7")]
