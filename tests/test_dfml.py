"""The dfml pieces: pseudo episodes, the class-learner objective, the LR table, per-episode heads (each one trained
as if alone), DiffusionMix with per-image λ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metadiff.config import ConfigError
from metadiff.data.images.episodes import EpisodeShape
from metadiff.dfml.class_learner import class_learner_loss, noised_guide_input
from metadiff.dfml.diffusionmix import denoise_timesteps
from metadiff.dfml.episode_heads import EpisodeHeads, train_heads
from metadiff.dfml.lr_table import TableLR, lr_at
from metadiff.dfml.pseudo_data import PseudoData
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.eval.fewshot import paired_lines
from metadiff.eval.per_task import paired_report
from metadiff.nets.backbones import build_backbone
from metadiff.nets.heads import MLPHead
from metadiff.stages.diffusionmix import beta_draws


def pseudo_data(n_classes: int = 6, per_class: int = 8) -> PseudoData:
    classes = torch.arange(n_classes).repeat_interleave(per_class)
    # every image carries its class in its first pixel, so episodes can be checked against their labels
    images = torch.zeros(len(classes), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = classes.to(torch.uint8) * 10
    return PseudoData(images, classes.clone(), classes, classes // 3, round=2)


def test_pseudo_episodes_are_labelled_consistently_and_seeded(tmp_path) -> None:
    data = pseudo_data()
    shape = EpisodeShape(n_way=5, k_shot=2, n_query=3)
    ep = data.episodes(shape, 4, torch.Generator().manual_seed(0))
    assert ep.support.shape == (4, 10, 1, 4, 4) and ep.query.shape == (4, 15, 1, 4, 4)
    assert ep.support.dtype == torch.float32 and float(ep.support.max()) <= 1.0
    pixel_class = lambda x: (x[..., 0, 0, 0] * 255 / 10).round().long()  # noqa: E731
    # queries: their global label is the class in their pixels, and queries of one way share a class with its support
    assert torch.equal(pixel_class(ep.query), ep.query_classes)
    for b in range(4):
        way_class = pixel_class(ep.support[b])[ep.support_labels[b] == 0].unique()
        assert len(way_class) == 1 and set(ep.query_classes[b][ep.query_labels[b] == 0].tolist()) == set(
            way_class.tolist()
        )
        assert len(pixel_class(ep.support[b]).unique()) == 5
    again = data.episodes(shape, 4, torch.Generator().manual_seed(0))
    assert torch.equal(again.query, ep.query)
    path = tmp_path / "round2.pt"
    data.save(path)
    loaded = PseudoData.load(path)
    assert loaded.round == 2 and torch.equal(loaded.images, data.images) and torch.equal(loaded.models, data.models)


def test_pseudo_episodes_need_enough_classes() -> None:
    with pytest.raises(ConfigError, match="fewer than n_way=5"):
        pseudo_data(n_classes=4).episodes(EpisodeShape(5, 1, 6), 1, torch.Generator())


def test_class_learner_kl_reductions_and_noise_domains() -> None:
    torch.manual_seed(0)
    schedule = NoiseSchedule.make("cosine", 1000)
    backbone = build_backbone("conv4", in_channels=1, mean=[0.5], std=[0.5], width=8).eval()
    head, learner = MLPHead(8, 6, norm="none"), MLPHead(8, 6, norm="none", time_conditioned=True)
    images, labels = torch.rand(12, 1, 16, 16), torch.arange(6).repeat(2)
    _, ce_b, kl_b = class_learner_loss(
        backbone, head, learner, images, labels, schedule, "fixed", "batchmean", torch.Generator().manual_seed(1)
    )
    _, ce_m, kl_m = class_learner_loss(
        backbone, head, learner, images, labels, schedule, "fixed", "mean", torch.Generator().manual_seed(1)
    )
    assert torch.allclose(ce_b, ce_m) and torch.allclose(kl_m * 6, kl_b)  # 'mean' also divides by the classes
    t, noise = torch.tensor([0]), torch.zeros(1, 1, 16, 16)
    # t = 0 with no noise: fixed gives back the [0, 1] image via [-1, 1]; faithful noises the input as is
    assert torch.allclose(noised_guide_input(images[:1], schedule, t, noise, "fixed"), images[:1], atol=1e-2)
    ab = schedule.alpha_bar(t).float()
    assert torch.allclose(noised_guide_input(images[:1], schedule, t, noise, "faithful"), ab.sqrt() * images[:1])


def test_class_learner_learns_noisy_classes() -> None:
    """Two classes (flat grey, checkerboard); after training, the class-learner tells them apart at moderate noise
    through a frozen random backbone."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.make("cosine", 1000)
    grid = torch.arange(16)
    checker = ((grid.view(16, 1) // 2 + grid.view(1, 16) // 2) % 2).float()
    modes = torch.stack([torch.full((16, 16), 0.5), checker])[:, None]
    backbone = build_backbone("conv4", in_channels=1, mean=[0.5], std=[0.5], width=16).eval()
    head = MLPHead(16, 2, norm="none")
    learner = MLPHead(16, 2, norm="none", time_conditioned=True)
    opt = torch.optim.Adam(learner.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        y = torch.randint(0, 2, (64,), generator=gen)
        loss, _, _ = class_learner_loss(backbone, head, learner, modes[y], y, schedule, "fixed", "batchmean", gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    y = torch.arange(2).repeat(50)
    t = torch.full((100,), 300)
    x = noised_guide_input(modes[y], schedule, t, torch.randn(100, 1, 16, 16, generator=gen), "fixed")
    with torch.no_grad():
        accuracy = (learner(backbone.embed(x), t).argmax(-1) == y).float().mean()
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20]) and accuracy > 0.9


def test_lr_lookup_table() -> None:
    lut = [[0, 0.1], [60, 0.006], [70, 0.0012], [80, 0.00024]]
    assert [lr_at(lut, e) for e in (0, 59, 60, 69, 70, 85)] == [0.1, 0.1, 0.006, 0.006, 0.0012, 0.00024]
    with pytest.raises(ConfigError, match="no entry covers epoch 0"):
        lr_at([[5, 0.1]], 0)


def test_the_table_scheduler_gives_the_table_exactly_and_resumes_where_it_was() -> None:
    lut = [[0, 0.1], [3, 0.006], [5, 0.0012]]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)  # the optimizer's own LR is replaced
    sched, seen = TableLR(opt, lut), []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [lr_at(lut, e) for e in range(7)] == [0.1, 0.1, 0.1, 0.006, 0.006, 0.0012, 0.0012]
    scaled = TableLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5), lut, scale=0.5)
    assert scaled.optimizer.param_groups[0]["lr"] == 0.1 * 0.5
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    resumed = TableLR(opt2, lut)
    resumed.load_state_dict(sched.state_dict())  # what Lightning does with a checkpoint's scheduler state
    resumed.step()
    assert opt2.param_groups[0]["lr"] == lr_at(lut, 8)
    with pytest.raises(ConfigError, match="no entry covers epoch 0"):
        TableLR(opt2, [[2, 0.1]])


@pytest.mark.parametrize("norm", ["batch_stats", "none"])
def test_episode_heads_train_each_episode_as_if_alone(norm: str) -> None:
    torch.manual_seed(0)
    features, labels = torch.randn(3, 10, 8), torch.randint(0, 5, (3, 10))
    torch.manual_seed(1)
    heads = EpisodeHeads(3, 8, 5, norm, "cpu")
    start = {k: v.detach().clone() for k, v in heads.params.items()}
    opt = torch.optim.SGD(heads.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train_heads(
        heads, opt, 20, lambda: F.cross_entropy(heads(features).transpose(1, 2), labels, reduction="none").mean(1)
    )
    for b in range(3):  # the same head trained alone on its own episode
        alone = MLPHead(8, 5, norm=norm)
        alone.load_state_dict({k: v[b] for k, v in start.items()})
        opt_b = torch.optim.SGD(alone.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for _ in range(20):
            opt_b.zero_grad()
            F.cross_entropy(alone(features[b]), labels[b]).backward()
            opt_b.step()
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(heads.params[key][b], value, rtol=1e-4, atol=1e-5)


def test_diffusionmix_helpers() -> None:
    assert denoise_timesteps(200, None).tolist() == list(range(200, -1, -1))
    steps = denoise_timesteps(200, 10)
    assert steps[0] == 200 and steps[-1] == 0 and len(steps) == 10 and bool((steps[1:] < steps[:-1]).all())
    draws = beta_draws(0.4, 4000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, beta_draws(0.4, 4000, torch.Generator().manual_seed(0)))
    # Beta(0.4, 0.4): mean 1/2, variance 1 / (4 (2 * 0.4 + 1)) = 0.139, mass near the ends
    assert abs(float(draws.mean()) - 0.5) < 0.02 and abs(float(draws.var()) - 0.1389) < 0.01


def test_resnet12_dropblock_anneals_from_zero_and_resumes_its_schedule() -> None:
    from metadiff.nets.backbones import AnnealedDropBlock

    block = AnnealedDropBlock(0.1, 2, anneal_calls=100)
    x = torch.ones(64, 8, 16, 16)
    assert block.rate() == 0.0 and torch.equal(block(x), x)  # call 0: nothing dropped
    for _ in range(49):
        block(x)
    assert block.rate() == pytest.approx(0.05)  # halfway: half the drop rate
    resumed = AnnealedDropBlock(0.1, 2, anneal_calls=100)
    resumed.load_state_dict(block.state_dict())  # the count travels in checkpoints
    assert resumed.rate() == pytest.approx(0.05)
    for _ in range(200):
        block(x)
    assert block.rate() == pytest.approx(0.1)  # capped at `drop` (keep rate 0.9)
    torch.manual_seed(0)
    dropped = (block(x) == 0).float().mean().item()
    assert 0.06 < dropped < 0.14, dropped  # blocks of a 0.1 rate
    assert torch.equal(block.eval()(x), x)  # evaluation never drops


def test_backbone_keys_of_another_backbone_are_a_config_error() -> None:
    from metadiff.nets.backbones import build_backbone

    net = build_backbone("resnet12", in_channels=3, mean=[0.5] * 3, std=[0.5] * 3, widths=[8, 8, 8, 16])
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 16, 4, 4) and net.out_dim == 16
    with pytest.raises(
        ConfigError,
        match=r"\['depth', 'width'\] are not keys of backbone 'resnet12' .*"
        r"model/backbone=resnet12",
    ):
        build_backbone("resnet12", in_channels=3, mean=[0.5] * 3, std=[0.5] * 3, width=64, depth=4)
    with pytest.raises(ConfigError, match=r"model.backbone.name='vit': expected one of \['conv4', 'resnet12'\]"):
        build_backbone("vit", in_channels=3, mean=[0.5], std=[0.5])


def test_real_pseudo_data_is_the_covered_classes_real_images_under_their_pseudo_labels() -> None:
    from metadiff.data.images.splits import TensorImageSplit
    from metadiff.dfml.pseudo_data import real_pseudo_data

    targets = torch.arange(5).repeat_interleave(4)
    images = (targets * 40).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    split = TensorImageSplit(images, targets, [f"c{i}" for i in range(5)])
    class_map = [{"class": 3, "model": 0, "local": 0}, {"class": 1, "model": 1, "local": 0}]
    data = real_pseudo_data(split, class_map, per_class=3, round_index=2)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and data.models.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[:3].eq(120).all() and data.images[3:].eq(40).all()  # class 3's pixels, then class 1's
    with pytest.raises(ValueError, match="per_class=5: meta-train class 3 has only 4"):
        real_pseudo_data(split, class_map, per_class=5, round_index=0)


def test_paired_report_and_lines_print_the_per_episode_difference() -> None:
    """The paired difference is the mean of per-episode a - b (not the difference of means' CIs), and the printed
    line shows it with its CI and note."""
    values = {"a": torch.tensor([0.5, 0.7, 0.9]), "b": torch.tensor([0.4, 0.5, 0.6])}
    report = paired_report("test", values, {"a_minus_b": ("a", "b")})
    assert report["test/a_minus_b"] == pytest.approx(0.2)
    assert report["test/a_minus_b_ci95"] > 0.0
    text = paired_lines("paired:", report, ["a_minus_b"], {"a_minus_b": "gap closed 40.0%"}, width=10)
    assert text.splitlines()[1] == f"  a_minus_b  +0.200 +- {report['test/a_minus_b_ci95']:.3f}, gap closed 40.0%"
    with pytest.raises(ValueError, match="paired 'a_minus_c'"):
        paired_report("test", values | {"c": torch.tensor([0.1])}, {"a_minus_c": ("a", "c")})
