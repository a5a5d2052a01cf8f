"""Every stage under both DDP launchers: each chain is built from nothing in its own root, every stage of it as a
2-rank gloo job, under `trainer=ddp_sim` (ranks spawned by metadiff.run, each running the whole stage) and
`trainer=ddp_cpu` (Lightning runs the command once per rank, as `trainer=ddp` on GPUs). The upstreams inherit the
trainer group, so one command runs its whole chain on 2 ranks.

- HyperLDM chain (on a small twin of synthvqa): clip, features, hnet, multitask, adaptation, hyperclip, hyperldm (fast_dev_run), then vae.
- Data-free chain: classifier (the judge), 2 diffusion_unet members, diffusion_zoo, dfml, diffusionmix (fast_dev_run).

What is checked beyond "it ran": every stage ran as a 2-rank job (ddp_sim: Lightning's rank-0 line that 2 ranks
joined, once per stage; ddp_cpu: each stage's summary printed by both ranks, whose processes live through the
chain); the evaluation of hyperclip (an upstream, so at its full test) covers each meta-test task once,
as in one process (a padded, sharded sampler gives one more on the small twin's 61); under ddp_cpu the two ranks agree on every metric both
report (a stage's summary of its artifact is rank 0's alone). How close DDP lands to one process:
tests/test_parity.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import (
    CONF_DIR,
    TWO_RANKS,
    _metrics,
    _quoted,
    debug,
    run_metrics,
    run_train,
    smoke_budget,
    written_artifacts,
)

pytestmark = pytest.mark.slow
SHORT_CHAIN_BUDGETS = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "debug" / "short_chain.yaml").upstream_overrides)

# The chain on a small twin of synthvqa (1,500 scenes, 202 tasks: 61 meta-test, an odd count a padded sampler would
# change), every stage at short_chain's budget; the pretraining stages take a few steps instead of its epoch (their
# evaluation stays whole), and the CLIP is trained (synthvqa_clip=trained), not read from its pinned weights.
SMALL_TWIN = ["data.source.generator.n_scenes=1500", "data.source.generator.n_tasks=202"]
META_TEST_TASKS = 61
SMALL_LATENT_BATCH = "data.latents_per_batch=64"  # the latent stages' 2 rows x 127 tasks: fewer than 256 latents
FEW_STEPS = ["trainer.max_epochs=1", "trainer.max_steps=4", "model.n_shot_max=0"]
UPSTREAM_BUDGETS = {
    **{name: [*budget, *SMALL_TWIN] for name, budget in SHORT_CHAIN_BUDGETS.items() if name.endswith("_synthvqa")},
    "features_synthvqa": ["synthvqa_clip=trained", *SMALL_TWIN],
    "hnet_synthvqa": [*FEW_STEPS, *SMALL_TWIN],
    "multitask_synthvqa": [*FEW_STEPS, *SMALL_TWIN],
}
UPSTREAM_BUDGETS["hyperclip_synthvqa"].append(SMALL_LATENT_BATCH)
SMALL_CHAIN = [
    debug("short_chain", "fdr"),
    *SMALL_TWIN,
    SMALL_LATENT_BATCH,
    *(f"++upstream_overrides.{name}={_quoted(budget)}" for name, budget in UPSTREAM_BUDGETS.items()),
]
CHAINS = {
    # fast_dev_run evaluates one batch: 16 tasks through a 5-step sampler, not the configured batch of all guidance
    # variants on many tasks; the pretraining stages take a few steps instead of short_chain's epoch (their
    # evaluation stays whole)
    "hyperldm": (
        [
            ["experiment=hyperldm_synthvqa", *SMALL_CHAIN, "data.eval_tasks_per_batch=16", "model.sampling.steps=5"],
            ["experiment=vae_synthvqa", *SMALL_CHAIN],
        ],
        ["clip", "features", "hnet", "adaptation", "multitask", "hyperclip", "hyperldm", "vae"],
    ),
    "datafree": (
        [["experiment=diffusionmix_glyphs", *smoke_budget("diffusionmix_glyphs", None, "fdr")]],
        ["classifier", "diffusion_unet", "diffusion_unet", "diffusion_zoo", "dfml", "diffusionmix"],
    ),
}
# values that are a rank's own by definition: its clock, its memory, its share of the work, its last training batch
PER_RANK = re.compile(r"^(time/|sys/|train/|pseudo/images_generated$|features/images_per_s$)")


def _printed_blocks(stdout: str) -> dict[str, list[dict[str, float]]]:
    """Every printed summary block (`== <task> (<stage>) finished: ==`) by its header, per-rank values left out."""
    blocks: dict[str, list[dict[str, float]]] = {}
    for block in stdout.split("== ")[1:]:
        header, found, _ = block.partition(" finished: ==")
        if found:
            blocks.setdefault(header, []).append({k: v for k, v in _metrics(block).items() if not PER_RANK.match(k)})
    return blocks


def _ranks_agree(stdout: str) -> list[str]:
    """The stage of every summary a ddp_cpu command printed, once per stage run, after checking that it was printed
    by both ranks and that they agree on the metrics both report."""
    stages = []
    for header, printed in _printed_blocks(stdout).items():
        assert len(printed) % 2 == 0, f"{header}: {len(printed)} summaries, expected one per rank and run"
        for rank0, rank1 in zip(printed[::2], printed[1::2], strict=True):
            shared = rank0.keys() & rank1.keys()
            assert {k: rank0[k] for k in shared} == {k: rank1[k] for k in shared}, f"{header}: the ranks disagree"
        stages += [header.rsplit("(", 1)[1].rstrip(")")] * (len(printed) // 2)
    return stages


@pytest.mark.parametrize("launcher", ["ddp_sim", "ddp_cpu"])
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_every_stage_of_a_chain_runs_on_two_ranks(chain: str, launcher: str, tmp_path: Path) -> None:
    commands, stages = CHAINS[chain]
    written: list[str] = []
    two_rank_runs: list[str] = []
    logs = ""
    for args in commands:
        proc = run_train([*args, f"trainer={launcher}", "trainer.enable_progress_bar=false"], tmp_path, timeout=900)
        logs += proc.stdout + proc.stderr
        written += [p.parent.name for p in written_artifacts(proc.stdout + proc.stderr)]
        if launcher == "ddp_cpu":
            two_rank_runs += _ranks_agree(proc.stdout)
    assert sorted(written) == sorted(stages), f"stages built in this root: {written}"
    if launcher == "ddp_sim":
        assert logs.count(TWO_RANKS) == len(stages), f"{logs.count(TWO_RANKS)} 2-rank jobs for {len(stages)} stages"
    else:
        assert sorted(two_rank_runs) == sorted(stages), f"stages printed by both ranks: {two_rank_runs}"
    if chain == "hyperldm":
        hyperclip = run_metrics(logs, "hyperclip")
        assert hyperclip["test/retrieval/n_tasks"] == META_TEST_TASKS  # every meta-test task once, as in one process
