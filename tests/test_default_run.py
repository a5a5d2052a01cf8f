"""The newcomer's command `python train.py`: the default experiment `hyperldm_synthvqa_demo`, the whole HyperLDM
chain on the embedded twin, ending with the claims table and the plot path.

Two sizes of the same command: CI runs it in a cold interpreter with every upstream stage short (`debug=short_chain`,
the chain the latent tests share, built once per session; tests/test_ddp_chains.py builds a chain from nothing) and a
2-epoch HyperLDM: it checks what the run ends with, not the method. `make test-demo` runs the exact default (what
`make demo` does) and checks the claims' main ordering on meta-test with paired 95% CIs: the figures the README and
docs/demo.md state."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_metrics, run_train, short_chain, written_artifact

# what the demo's HyperLDM reads (the CLIP is pinned, conf/synthvqa_clip/pinned.yaml; no HyperCLIP rows in the demo)
UPSTREAMS = {"features", "hnet", "adaptation", "multitask"}


def assert_ends_with_the_claims(proc: subprocess.CompletedProcess) -> dict[str, float]:
    """The run's artifact was made from the demo's upstreams, and its last lines are the demo's summary: its metrics,
    then the claims table and the path of a plot that exists. Returns the run's metrics (its artifact's)."""
    stdout = proc.stdout
    manifest = json.loads((written_artifact(stdout + proc.stderr, "hyperldm") / "manifest.json").read_text())
    assert set(manifest["upstream"]) == UPSTREAMS, manifest["upstream"]
    last = stdout.rstrip().split("== ")[-1]
    assert last.startswith("hyperldm_synthvqa_demo (hyperldm) finished: ==")
    lines = last.rstrip().splitlines()
    assert lines[-1].strip().startswith("outputs: ")
    table = next(i for i, line in enumerate(lines) if line.startswith("zero-shot accuracy on meta-test tasks"))
    assert not any(line.strip().startswith(("test/", "val/", "train/")) for line in lines[table:])  # metrics first
    assert any("cfg_selected_minus_hnet_init" in line for line in lines[table:])
    plot = next(line.split("plot: ", 1)[1] for line in last.splitlines() if line.startswith("plot: "))
    assert Path(plot).is_file() and plot.endswith("accuracy_vs_guidance.png")
    return run_metrics(proc, "hyperldm")


@pytest.mark.xdist_group("synthvqa_latent_chain")  # the short chain the latent tests share, on their worker
def test_default_command_on_a_short_chain_ends_with_the_claims_table(cache_root: Path) -> None:
    # a cold interpreter, as a newcomer starts it (the other checks fork the worker's warm one: train_process.py)
    proc = run_train(
        [
            *short_chain("synthvqa"),
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=2",
            "model.sampling.steps=10",
            "+trainer.limit_test_batches=1",  # 128 of the 373 meta-test tasks: the table, not its figures
        ],
        cache_root,
        timeout=1200,
        fresh=True,
    )
    m = assert_ends_with_the_claims(proc)
    assert m["test/selected_scale"] in (0.0, 1.0, 1.5, 4.0, 7.5, 15.0)


@pytest.mark.slow
@pytest.mark.demo
def test_demo_shows_the_claims_main_ordering(tmp_path: Path) -> None:
    """The demo budget keeps the table's main ordering: CFG at the scale chosen on meta-val beats the unconditional
    sample, the HNET init and multitask zero-shot, each paired per task with its 95% CI above 0."""
    m = assert_ends_with_the_claims(run_train([], tmp_path, timeout=1800, fresh=True))
    for ref in ("cfg0", "hnet_init", "multitask"):
        diff = f"test/cfg_selected_minus_{ref}"
        assert m[diff] - m[diff + "_ci95"] > 0.0, (ref, m[diff], m[diff + "_ci95"])
