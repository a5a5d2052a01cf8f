"""Failures under DDP that must stop every rank at once, in one line: a loss that goes non-finite on ONE rank only
(the others would sit in the gradient all-reduce: until NCCL's timeout on GPUs, a gloo "Connection closed by peer"
traceback on CPU). Runs of 2 gloo ranks on the embedded glyph classifier, whose loss is each rank's own (no
gather in the forward pass that would spread the NaN to the other rank)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_train

DIVERGED = (
    "error: stage 'classifier' (classifier_glyphs): the training loss is nan on rank 1 of 2 at epoch 0, "
    "global step 2, batch 2; lower the learning rate or check the inputs"
)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp_cpu", "ddp_sim"])
def test_a_loss_non_finite_on_one_rank_stops_every_rank_in_one_line(launcher: str, tmp_path: Path) -> None:
    """Rank 1's weights turn NaN after 2 batches, rank 0's stay finite: every rank stops before the next update with
    the same line naming the rank (exit 2). `ddp_cpu` runs the command once per rank (as `trainer=ddp`/torchrun
    on GPUs): each rank prints its own line, and before the fix rank 0 died in the all-reduce with gloo's traceback
    (exit 1). The timeout bounds the hang that NCCL would give."""
    proc = run_train(
        [
            "experiment=classifier_glyphs",
            "debug=diverge",
            "callbacks.poison.after=2",
            "callbacks.poison.rank=1",
            "trainer.max_steps=6",
            "test=false",
            "trainer.enable_progress_bar=false",
            f"trainer={launcher}",
        ],
        tmp_path,
        check=False,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [DIVERGED] * (2 if launcher == "ddp_cpu" else 1), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "outputs" / "artifacts" / "classifier").exists()
