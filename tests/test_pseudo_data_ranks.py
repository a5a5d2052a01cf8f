"""The pseudo data of a dfml round split over DDP ranks: each rank samples a disjoint share of the round's batches
(chunks), the shares are gathered, and the result equals the 1-process round exactly (uint8 for uint8), in both
compat modes. Unit level with tiny random UNets (the ranks as threads around a fake all_gather), then end to end under
`trainer=ddp_cpu` (2 gloo processes) against a 1-process run with the same seed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_metrics, run_train, smoke_budget, summaries
from metadiff.dfml.pseudo_data import (
    PseudoData,
    assemble_pseudo_data,
    generate_chunks,
    generate_pseudo_data,
    plan_chunks,
    split_chunks,
)
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.nets.backbones import build_backbone
from metadiff.nets.heads import MLPHead
from metadiff.nets.unet import ImageDenoiser

# compat -> the class-learner norm its config uses (conf/compat): faithful normalises over the batch (B9)
LEARNER_NORM = {"fixed": "none", "faithful": "batch_stats"}
GEN = {"per_class": 5, "batch_size": 4, "steps": 2, "scale": 1.0, "spacing": "leading"}  # 15 a member: 4, 4, 4, 3


def tiny(compat: str) -> tuple[DiffusionZoo, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    unet = {
        "block_out_channels": [8, 8],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D"] * 2,
        "up_block_types": ["UpBlock2D"] * 2,
        "norm_num_groups": 4,
    }
    models = [
        ImageDenoiser.from_config({"image_size": 8, "channels": 1, "unet": unet}).eval().requires_grad_(False)
        for _ in range(2)
    ]
    class_map = [{"class": c, "model": c // 3, "local": c % 3} for c in range(6)]
    zoo = DiffusionZoo(
        models,
        NoiseSchedule.make("cosine", 1000),
        {"name": "cosine"},
        class_map,
        [str(c) for c in range(6)],
        image_size=8,
        channels=1,
    )
    backbone = build_backbone("conv4", in_channels=1, mean=[0.5], std=[0.5], width=8, depth=2).eval()
    learner = MLPHead(8, 6, norm=LEARNER_NORM[compat], time_conditioned=True).eval()
    return zoo, backbone, learner


def one_process(compat: str, seed: int = 3) -> PseudoData:
    zoo, backbone, learner = tiny(compat)
    return generate_pseudo_data(
        zoo,
        backbone,
        learner,
        GEN["per_class"],
        GEN["batch_size"],
        GEN["steps"],
        GEN["scale"],
        compat,
        seed,
        round_index=1,
        spacing=GEN["spacing"],
    )


def assert_same_round(a: PseudoData, b: PseudoData) -> None:
    assert a.images.dtype == b.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images), f"{int((a.images != b.images).sum())} pixels differ"
    for key in ("labels", "classes", "models"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.round == b.round


def test_the_split_covers_every_chunk_once_and_balances_images() -> None:
    zoo, _, _ = tiny("fixed")
    chunks = plan_chunks(zoo, GEN["per_class"], GEN["batch_size"])
    assert [len(c.classes) for c in chunks] == [4, 4, 4, 3] * 2 and [c.model for c in chunks] == [0] * 4 + [1] * 4
    for world in (1, 2, 3, 4, 7):
        shares = split_chunks(chunks, world)
        assert sorted(i for s in shares for i in s) == list(range(len(chunks))), world
        images = [sum(len(chunks[i].classes) for i in s) for s in shares]
        assert max(images) - min(images) <= max(len(c.classes) for c in chunks), (world, images)
    assert split_chunks(chunks, 2) == [[0, 2, 3, 5], [1, 4, 6, 7]]  # largest first, ties to rank 0: 15 images each


@pytest.mark.parametrize("compat", ["fixed", "faithful"])
def test_two_rank_shares_merge_into_the_one_process_round(compat: str) -> None:
    """The chunk-level function for rank 0 of 2 and rank 1 of 2, merged, is the 1-process round."""
    whole = one_process(compat)
    zoo, backbone, learner = tiny(compat)
    chunks = plan_chunks(zoo, GEN["per_class"], GEN["batch_size"])
    images = {}
    for share in split_chunks(chunks, 2):
        mine = [chunks[i] for i in share]
        out = generate_chunks(zoo, backbone, learner, mine, GEN["steps"], GEN["scale"], compat, 3, GEN["spacing"])
        images.update({c.index: x for c, x in zip(mine, out, strict=True)})
    assert_same_round(assemble_pseudo_data(zoo, chunks, images, compat, 1), whole)
    # the seed matters, and the same seed is the same round
    assert torch.equal(one_process(compat).images, whole.images)
    assert not torch.equal(one_process(compat, seed=4).images, whole.images)


def test_faithful_guidance_depends_on_the_batch_so_chunks_stay_whole_batches() -> None:
    """Why the split never re-batches: under faithful's batch-statistics class-learner, the first 2 images of a batch
    come out otherwise when sampled as a batch of their own (same generator, same noise)."""
    zoo, backbone, learner = tiny("faithful")
    chunk = plan_chunks(zoo, GEN["per_class"], GEN["batch_size"])[0]
    half = type(chunk)(chunk.index, chunk.model, chunk.classes[:2])
    full = generate_chunks(zoo, backbone, learner, [chunk], GEN["steps"], 50.0, "faithful", 3, GEN["spacing"])[0]
    alone = generate_chunks(zoo, backbone, learner, [half], GEN["steps"], 50.0, "faithful", 3, GEN["spacing"])[0]
    assert not torch.equal(full[:2], alone)


@pytest.mark.parametrize("compat", ["fixed", "faithful"])
def test_generate_pseudo_data_on_two_ranks_samples_only_its_share(compat: str) -> None:
    """generate_pseudo_data itself on 2 ranks (threads, an all_gather through shared slots): each rank samples only
    its chunks' images, and both end with the 1-process round."""
    whole = one_process(compat)
    slots: list[torch.Tensor | None] = [None, None]
    barrier = threading.Barrier(2)
    results: dict[int, PseudoData] = {}
    sampled: dict[int, int] = {0: 0, 1: 0}
    errors: list[BaseException] = []

    nets = [tiny(compat) for _ in (0, 1)]  # each rank its own copy (built here: tiny() seeds the global generator)

    def rank_main(rank: int) -> None:
        try:
            zoo, backbone, learner = nets[rank]
            sample = zoo.sample

            def counted(model, n, *args, **kwargs):
                sampled[rank] += n
                return sample(model, n, *args, **kwargs)

            zoo.sample = counted

            def all_gather(local: torch.Tensor) -> torch.Tensor:
                slots[rank] = local.clone()
                barrier.wait(timeout=120)
                return torch.stack(slots)

            results[rank] = generate_pseudo_data(
                zoo,
                backbone,
                learner,
                GEN["per_class"],
                GEN["batch_size"],
                GEN["steps"],
                GEN["scale"],
                compat,
                3,
                round_index=1,
                spacing=GEN["spacing"],
                rank=rank,
                world_size=2,
                all_gather=all_gather,
            )
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # chunks 0, 2, 3, 5 (4 + 4 + 3 + 4 images) on rank 0, 1, 4, 6, 7 (4 + 4 + 4 + 3) on rank 1: 15 of the 30 each
    assert sampled == {0: 15, 1: 15}
    for rank in (0, 1):
        assert_same_round(results[rank], whole)
        assert results[rank].ranks.tolist() == [0] * 4 + [1] * 4 + [0] * 4 + [0] * 3 + [1] * 4 + [0] * 4 + [1] * 7
    assert whole.ranks.tolist() == [0] * 30


@pytest.mark.slow
def test_ddp_round_equals_the_one_process_round(cache_root: Path, tmp_path: Path) -> None:
    """`trainer=ddp_cpu` (2 processes): round 0 saved by rank 0 is the 1-process run's, pixel for pixel, and each
    rank sampled one of the round's two batches (2 zoo members x 3 classes x 7 images, batches of 32)."""
    common = [
        "experiment=dfml_glyphs",
        *smoke_budget("dfml_glyphs"),
        "trainer.max_epochs=1",
        "data.train.steps_per_epoch=1",
        "data.episodes.n_episodes=2",
        "test=false",
        "trainer.enable_progress_bar=false",
    ]
    # both runs on the 1-process run's upstreams (the zoo above all): inherited, the trainer group would make the DDP
    # run build its own
    upstreams = compose_config(common, cache_root, tmp_path / "compose").upstream
    common += [f"upstream.{name}.inherit_groups=[]" for name in upstreams]
    # one torch thread in every process (fresh interpreters read OMP_NUM_THREADS; a forked one keeps its parent's
    # count): CPU kernels' float results can depend on the thread count, and the DDP launcher would otherwise give
    # each rank cpu_count / world_size threads against the 1-process run's cpu_count
    env = {"OMP_NUM_THREADS": "1"}
    single = run_train(
        [*common, "task_name=pseudo_ranks_1", f"paths.output_dir={tmp_path / 'single'}"],
        cache_root,
        env=env,
        fresh=True,
    )
    ddp = run_train(
        [*common, "trainer=ddp_cpu", "task_name=pseudo_ranks_ddp", f"paths.output_dir={tmp_path / 'ddp'}"],
        cache_root,
        env=env,
        fresh=True,
    )
    assert "MEMBER: 2/2" in ddp.stdout + ddp.stderr
    one = PseudoData.load(tmp_path / "single" / "pseudo" / "round0.pt")
    two = PseudoData.load(tmp_path / "ddp" / "pseudo" / "round0.pt")
    assert len(one) == 6 * 7
    assert_same_round(two, one)
    assert one.ranks.tolist() == [0] * 42 and two.ranks.tolist() == [0] * 21 + [1] * 21
    ranks = summaries(ddp.stdout, "pseudo_ranks_ddp")  # what each rank printed: only rank 0 publishes
    assert sorted(r["pseudo/images_generated"] for r in ranks) == [21.0, 21.0], ranks
    assert run_metrics(single, "dfml")["pseudo/images_generated"] == 42.0
