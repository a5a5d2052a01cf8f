"""Class-learner guidance pushes the zoo's samples toward the requested pseudo class (issue 8 acceptance), on a
zoo member whose exact eps-predictor is known: data = two images, one per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metadiff.dfml.guidance import class_log_prob, guidance_target, guide_input
from metadiff.diffusion.sampling import classifier_guidance, sample
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.nets.backbones import build_backbone
from metadiff.nets.heads import MLPHead

SIDE = 16
AMPLITUDE = 0.5


def two_modes() -> torch.Tensor:
    """Class 0: horizontal stripes; class 1: vertical stripes ([-1, 1] diffusion space). Faint, so the sampler
    commits to a class late in the chain, where the class-learner is sure (and its gradient matters)."""
    stripes = AMPLITUDE * (torch.arange(SIDE) % 4 < 2).float().mul(2).sub(1)
    return torch.stack([stripes.view(SIDE, 1).expand(SIDE, SIDE), stripes.view(1, SIDE).expand(SIDE, SIDE)])[:, None]


def exact_eps(schedule: NoiseSchedule, modes: torch.Tensor):
    """The optimal eps-predictor of an equal mixture of the two images."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bar(t).view(-1, 1, 1, 1).to(x)
        d2 = ((x[:, None] - ab.sqrt()[:, None] * modes[None]) ** 2).flatten(2).sum(-1)  # [B, 2]
        w = (-d2 / (2 * (1 - ab.view(-1, 1)))).softmax(-1)
        x0 = torch.einsum("bk,kchw->bchw", w, modes)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return eps


def train_class_learner(schedule: NoiseSchedule, modes: torch.Tensor, compat: str):
    torch.manual_seed(0)
    backbone = build_backbone("conv4", in_channels=1, mean=[0.5], std=[0.5], width=16)
    learner = MLPHead(16, 2, norm="none", time_conditioned=True)  # LayerNorm over 2 logits keeps only a sign
    opt = torch.optim.Adam([*backbone.parameters(), *learner.parameters()], lr=3e-3)
    for _ in range(150):
        y = torch.randint(0, 2, (64,))
        t = torch.randint(0, schedule.n_timesteps, (64,))
        x_t = schedule.add_noise(modes[y], torch.randn(64, 1, SIDE, SIDE), t)
        f = F.normalize(backbone(guide_input(x_t, compat)).mean(dim=(2, 3)), dim=-1)
        loss = F.cross_entropy(learner(f, t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return backbone.eval().requires_grad_(False), learner.eval().requires_grad_(False)


def nearest_mode(x: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    return ((x[:, None] - modes[None]) ** 2).flatten(2).sum(-1).argmin(-1)


def test_guidance_pushes_samples_to_the_requested_class() -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    modes = two_modes()
    backbone, learner = train_class_learner(schedule, modes, "fixed")
    steps = schedule.set_timesteps(20, "trailing")
    n, target = 200, 1
    shares = {}
    for scale in (0.0, 4.0):
        log_prob = class_log_prob(backbone, learner, torch.full((n,), target), "fixed")
        guide = classifier_guidance(log_prob, scale, schedule) if scale else None
        x = sample(
            exact_eps(schedule, modes),
            schedule,
            steps,
            shape=(n, 1, SIDE, SIDE),
            guidance=guide,
            generator=torch.Generator().manual_seed(0),
            clip_x0=1.0,
        )
        judged = learner(
            F.normalize(backbone(guide_input(x, "fixed")).mean(dim=(2, 3)), dim=-1), torch.zeros(n, dtype=torch.long)
        ).argmax(-1)
        shares[scale] = (
            float((judged == target).float().mean()),
            float((nearest_mode(x, modes) == target).float().mean()),
        )
    assert 0.3 < shares[0.0][1] < 0.7  # unguided: the two classes about equally often
    assert shares[4.0][1] > 0.9 and shares[4.0][0] > 0.9  # guided: nearly all in the requested class
    assert shares[4.0][0] > shares[0.0][0] + 0.3


def test_compat_pins_the_original_guidance_target_and_domain() -> None:
    assert [guidance_target(i, "fixed") for i in (0, 4, 5, 12)] == [0, 4, 5, 12]
    assert [guidance_target(i, "faithful") for i in (0, 4, 5, 12)] == [0, 4, 0, 2]  # the original's y % 5 (B1)
    x = torch.tensor([-1.0, 0.0, 1.0])
    assert guide_input(x, "fixed").tolist() == [0.0, 0.5, 1.0] and guide_input(x, "faithful").tolist() == x.tolist()


def test_faithful_labels_follow_the_lexicographic_folder_order() -> None:
    from metadiff.dfml.pseudo_data import lexicographic_labels

    labels = lexicographic_labels(13)
    # folders sort as class0, class1, class10, class11, class12, class2, ..., class9
    assert labels[:3] == [0, 1, 5] and labels[10:] == [2, 3, 4] and sorted(labels) == list(range(13))


def test_pseudo_data_of_a_two_member_zoo(tmp_path) -> None:
    from metadiff.dfml.pseudo_data import generate_pseudo_data
    from metadiff.diffusion.zoo import DiffusionZoo
    from metadiff.nets.unet import ImageDenoiser

    torch.manual_seed(0)
    unet = {
        "block_out_channels": [8, 8],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D"] * 2,
        "up_block_types": ["UpBlock2D"] * 2,
        "norm_num_groups": 4,
    }
    models = [ImageDenoiser(8, 1, unet).eval() for _ in range(2)]
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
    learner = MLPHead(8, 6, norm="none", time_conditioned=True).eval()
    fixed = generate_pseudo_data(
        zoo, backbone, learner, per_class=2, batch_size=4, steps=2, scale=1.0, compat="fixed", seed=0
    )
    assert fixed.images.shape == (12, 1, 8, 8) and fixed.images.dtype == torch.uint8
    assert fixed.classes.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and torch.equal(fixed.labels, fixed.classes)
    assert fixed.models.tolist() == [0] * 6 + [1] * 6
    faithful = generate_pseudo_data(
        zoo, backbone, learner, per_class=2, batch_size=4, steps=2, scale=1.0, compat="faithful", seed=0
    )
    assert torch.equal(faithful.classes, fixed.classes)


def test_diffusionmix_keeps_a_clean_mix_when_barely_noised_and_pins_the_label_weights() -> None:
    from metadiff.dfml.diffusionmix import interpolate, mixup_label_weights
    from metadiff.diffusion.zoo import DiffusionZoo

    schedule = NoiseSchedule.make("cosine", 1000)
    a, b = torch.zeros(3, 1, SIDE, SIDE), torch.ones(3, 1, SIDE, SIDE)
    mix_target = 0.25 * torch.ones(1, 1, SIDE, SIDE)  # (1 - 0.25) * 0 + 0.25 * 1 in [0, 1] pixels
    oracle = exact_eps(schedule, (2 * mix_target - 1).expand(2, -1, -1, -1).clone())  # data = the mix itself
    zoo = DiffusionZoo([oracle], schedule, {}, [], [], SIDE, 1)
    out = interpolate(zoo, 0, a, b, t=5, lam=0.25, compat="fixed", generator=torch.Generator().manual_seed(0))
    assert out.shape == a.shape and torch.allclose(out, mix_target.expand_as(out), atol=0.02)
    assert mixup_label_weights(0.25, "fixed") == (0.75, 0.25)
    assert mixup_label_weights(0.25, "faithful") == (0.25, 0.75)  # the original's swapped weights (B7)
