"""What a run prints when nobody watches a terminal (a SLURM log, `> run.log`, `| tee`): periodic one-line progress
instead of Lightning's bar, none of the known third-party chatter, and the final summary as the last thing printed
(src/metadiff/progress.py, src/metadiff/logs.py)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import compose_config, parse_summary, run_metrics
from metadiff.logs import CHATTY_INFO, quiet_third_party
from metadiff.progress import ProgressLines, format_elapsed
from metadiff.store import config_fingerprint
from train_process import _forkserver, _run_entry_point

# What every run printed before (issue 20): each must be gone from a redirected run.
CHATTER = [
    "litlogger",  # Lightning's advertising tip (Trainer)
    "litmodels",  # ... and its checkpoint tip
    "Trainer already configured with model summary callbacks",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "TPU available",
    "isinstance(treespec, LeafSpec)",  # FutureWarning from Lightning's own pytree helper
    "[root][INFO]",  # open_clip's INFO trace of building a model
    "Parsing model identifier",
    "No pretrained weights loaded",  # open_clip, before create_clip loads a checkpoint itself
]
PROGRESS = re.compile(
    r"\[metadiff\.progress\]\[INFO\] - clip_synthvqa \(clip\) training: batch (\d+)/(\d+), "
    r"epoch (\d+)/2, step (\d+)/(\d+) \| \d+:\d\d:\d\d elapsed \| train/loss [-\d.e]+"
)
VALIDATION = re.compile(
    r"\[metadiff\.progress\]\[INFO\] - clip_synthvqa \(clip\) validation at epoch (\d)/2, "
    r"step \d+/\d+ \| \d+:\d\d:\d\d elapsed \| .*val/zeroshot_acc [\d.]+"
)


def _run_into_one_pipe(argv: list[str], root: Path, timeout: float = 600) -> tuple[int | None, str]:
    """`python train.py argv 2>&1 | cat`: stdout and stderr into one pipe (a FIFO), so the output keeps the order in
    which the run wrote it, as in a SLURM log. The run is forked from the test worker's warm interpreter
    (tests/train_process.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    argv = [*argv, f"paths.root_dir={root}", "hydra.job.chdir=false"]
    with tempfile.TemporaryDirectory(prefix="train-fifo-") as tmp:
        fifo = Path(tmp) / "out"
        os.mkfifo(fifo)
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(fifo.read_bytes()), daemon=True)
        reader.start()
        child = _forkserver().Process(target=_run_entry_point, args=(argv, env, str(fifo), str(fifo)))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
        if reader.is_alive() and not chunks:  # the child never opened the pipe: let the reader's open return
            with open(fifo, "wb"):
                pass
        reader.join(30)
    return child.exitcode, b"".join(chunks).decode(errors="replace")


def test_a_redirected_run_prints_progress_lines_no_chatter_and_ends_with_its_summary(cache_root: Path) -> None:
    code, out = _run_into_one_pipe(
        [
            "experiment=clip_synthvqa",
            "data.n_train_pairs=128",
            "data.batch_size=32",
            "data.n_val_tasks=10",
            "trainer.max_epochs=2",
            "+trainer.limit_test_batches=2",
            "callbacks.progress.every_s=0.001",
        ],
        cache_root,
    )
    assert code == 0, out[-4000:]

    progress = [m for m in map(PROGRESS.search, out.splitlines()) if m]
    assert len(progress) >= 3, out[-4000:]
    steps = [int(m[4]) for m in progress]
    assert steps == sorted(set(steps)) and steps[0] >= 1, steps  # the step count only goes up
    assert {int(m[5]) for m in progress} == {8}  # 4 batches x 2 epochs
    assert {int(m[3]) for m in progress} == {1, 2}
    assert [int(m[1]) for m in map(VALIDATION.search, out.splitlines()) if m] == [1, 2]  # one line per validation

    assert "\r" not in out and "it/s" not in out, "Lightning's progress bar wrote into a file"
    for chatter in CHATTER:
        assert chatter not in out, f"filtered chatter printed: {chatter!r}"

    lines = [line for line in out.splitlines() if line.strip()]
    header = max(i for i, line in enumerate(lines) if line.startswith("== clip_synthvqa (clip) finished: =="))
    tail = lines[header + 1 :]
    assert tail[-1].startswith("  outputs: "), tail[-3:]
    # the metrics (one per line, 4 places), then the stage's results table (Stage.set_results_text), then the outputs
    table = tail.index("CLIP zero-shot accuracy on meta-test tasks (mean +- 95% CI):")
    assert tail[:table] and all(re.fullmatch(r"  \S+ +-?\d+\.\d{4}", line) for line in tail[:table]), tail
    assert [line.split()[0] for line in tail[table + 1 : -1]] == ["zero-shot", "chance"], tail[table:]
    printed, published = parse_summary(out), run_metrics(out, "clip")  # the block shows every metric, to 4 places
    assert set(printed) == {*published, "time/run_seconds"}, (sorted(printed), sorted(published))
    assert {k: printed[k] for k in published} == {k: float(f"{v:.4f}") for k, v in published.items()}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _trainer(**changes: object) -> SimpleNamespace:
    fields = {
        "is_global_zero": True,
        "current_epoch": 0,
        "max_epochs": 3,
        "global_step": 0,
        "max_steps": -1,
        "num_training_batches": 10,
        "estimated_stepping_batches": 300,
        "sanity_checking": False,
        "progress_bar_metrics": {"train/loss": 2.5, "v_num": 0.0},
        "callback_metrics": {"val/acc": 0.75, "val/chance": 0.2},
    }
    return SimpleNamespace(**{**fields, **changes})


def test_progress_lines_are_throttled_by_the_clock(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    lines = ProgressLines("task", "stage", every_s=30, metric="val/acc", clock=clock)
    lines.active = True  # as when stdout is a file (pytest's capture is not a terminal either)
    trainer, module = _trainer(), SimpleNamespace(automatic_optimization=True)
    caplog.set_level(logging.INFO, logger="metadiff.progress")
    lines.setup(trainer, module, "fit")
    lines.on_train_start(trainer, module)
    printed_at = []
    for second in (1, 10, 29.9, 30, 31, 59.9, 60, 61, 150, 150.5, 180):
        clock.now = 1000.0 + second
        trainer.global_step = int(second)
        before = len(caplog.records)
        lines.on_train_batch_end(trainer, module, None, None, batch_idx=int(second) % 10)
        if len(caplog.records) > before:
            printed_at.append(second)
    assert printed_at == [30, 60, 150, 180]  # >= 30 s after the previous line, never two within 30 s
    assert caplog.records[0].getMessage() == (
        "task (stage) training: batch 1/10, epoch 1/3, step 30/300 | 0:00:30 elapsed | train/loss 2.5 | val/acc 0.75"
    )

    caplog.clear()
    lines.on_validation_end(trainer, module)  # a validation result is always reported, whatever the clock says
    assert caplog.records[-1].getMessage() == (
        "task (stage) validation at epoch 1/3, step 180/300 | 0:03:00 elapsed | val/acc 0.75, val/chance 0.2"
    )
    clock.now += 1000  # due again, but:
    lines.on_validation_end(_trainer(sanity_checking=True), module)  # the sanity check is no result
    lines.on_train_batch_end(_trainer(is_global_zero=False), module, None, None, batch_idx=0)  # other ranks: quiet
    lines.active = False  # stdout is a terminal: Lightning's bar reports, this stays quiet
    lines.on_train_batch_end(trainer, module, None, None, batch_idx=0)
    lines.on_validation_end(trainer, module)
    assert len(caplog.records) == 1


def test_lines_name_the_loader_of_several_and_the_epochs_training_ran(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    lines = ProgressLines("feat", "features", every_s=1, metric=None, clock=clock)
    lines.active = True
    caplog.set_level(logging.INFO, logger="metadiff.progress")
    trainer = _trainer(num_predict_batches=[24, 3])
    lines.setup(trainer, None, "predict")
    clock.now += 5
    lines.on_predict_batch_end(trainer, None, None, None, batch_idx=2, dataloader_idx=1)
    assert caplog.records[-1].getMessage() == "feat (features) predicting loader 2/2: batch 3/3 | 0:00:05 elapsed"
    # manual optimisation stopped by max_steps=2 in the first epoch, which Lightning then counts as done
    stopped = _trainer(current_epoch=1, global_step=2, max_epochs=2, max_steps=2)
    lines.on_train_start(stopped, SimpleNamespace(automatic_optimization=False))
    lines.on_train_end(stopped, None)
    assert caplog.records[-1].getMessage() == (
        "feat (features) training done: epoch 1/2, step 2/2 | 0:00:05 elapsed | train/loss 2.5"
    )


def test_progress_interval_must_give_a_line_at_least_once_a_minute() -> None:
    for every_s in (0, -1, 61):
        with pytest.raises(ValueError, match="once a minute"):
            ProgressLines("task", "stage", every_s=every_s, metric=None)
    assert format_elapsed(3723.9) == "1:02:03"


@pytest.mark.parametrize("experiment", ["clip_synthvqa", "features_synthvqa", "diffusion_unet_glyphs"])
def test_every_callbacks_choice_has_the_progress_lines(experiment: str, tmp_path: Path) -> None:
    """default, none (predict-only stages) and ema all include conf/callbacks/console.yaml, which sets the interval."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path, tmp_path / "out")
    assert cfg.callbacks.progress._target_ == "metadiff.progress.ProgressLines"
    assert cfg.callbacks.progress.every_s == 30
    assert cfg.callbacks.progress.metric == cfg.optimized_metric
    # the console's interval is not part of what a run computes: it must not rebuild any artifact
    quieter = compose_config([f"experiment={experiment}", "callbacks.progress.every_s=5"], tmp_path, tmp_path / "out")
    assert config_fingerprint(quieter) == config_fingerprint(cfg)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Take the filters that `quiet_third_party` installs off again, so other tests of this worker see plain logging."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in CHATTY_INFO)]
    saved = [list(logger.filters) for logger in loggers]
    yield
    for logger, filters in zip(loggers, saved, strict=True):
        logger.filters[:] = filters


@pytest.mark.usefixtures("restored_logging")
def test_filters_drop_the_known_chatter_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    from metadiff.features.clip_models import create_clip

    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        quiet_third_party()  # idempotent: upstream stages run `train` again in the same process
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
        rank_zero.info("GPU available: False, used: False")
        rank_zero.warning("Trainer already configured with model summary callbacks (a warning is never dropped)")
        create_clip("metadiff-tiny-vit")  # open_clip: INFO lines and "No pretrained weights loaded" on the root logger
        logging.getLogger().warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(message, FutureWarning, "mine.py", 1, module="mypackage")  # not Lightning's: shown
        warnings.warn("a user's own warning", UserWarning, stacklevel=1)
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [
        "GPU available: False, used: False",
        "Trainer already configured with model summary callbacks (a warning is never dropped)",
        "No pretrained weights loaded for model 'x'. Model initialized randomly.",
    ]  # not open_clip's
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, message),
        (UserWarning, "a user's own warning"),
    ]
    assert len(logging.getLogger().filters) == len(set(map(type, logging.getLogger().filters)))
