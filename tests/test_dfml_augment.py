"""The pseudo-image augmentation (spec §2.4): every image its own crop, flip, jitter and erasing, all from the step's
generator; what each transform may and may not change."""

from __future__ import annotations

import pytest
import torch

from metadiff.dfml.augment import AugmentSpec, augment, color_jitter, random_crop, random_erasing

SPEC_CFG = {
    "enabled": True,
    "crop_padding": 4,
    "hflip": True,
    "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2},
    "erasing": {"p": 0.5, "scale": [0.02, 0.33], "ratio": [0.3, 3.3]},
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_shifts_each_image_by_its_own_offset_within_the_padding() -> None:
    x = torch.zeros(200, 1, 16, 16)
    x[:, 0, 8, 8] = 1.0  # one bright pixel: where it lands is the crop offset
    out = random_crop(x, 4, gen())
    assert out.shape == x.shape
    moved = [torch.nonzero(img[0]).tolist() for img in out]
    offsets = {tuple(p[0]) for p in moved if p}
    assert all(4 <= r <= 12 and 4 <= c <= 12 for r, c in offsets)  # at most `padding` away from (8, 8)
    assert len(offsets) > 40  # per image, not one crop for the batch (81 possible offsets)
    assert sum(1 for p in moved if p) == 200  # the pixel never leaves a 16 px image under 4 px of padding


def test_erasing_fills_one_box_of_the_allowed_size_in_about_half_the_images() -> None:
    x = torch.ones(400, 3, 32, 32)
    fill = torch.tensor([0.1, 0.2, 0.3])
    out = random_erasing(x, 0.5, (0.02, 0.33), (0.3, 3.3), fill, gen())
    erased = (out != 1).any(dim=1)  # [N, H, W] erased pixels
    share = erased.flatten(1).float().mean(1)
    hit = share > 0
    assert 0.4 < hit.float().mean() < 0.6
    assert share[hit].min() >= 0.015 and share[hit].max() <= 0.36  # scale (0.02, 0.33), sides rounded to pixels
    for img, mask in zip(out[hit][:20], erased[hit][:20], strict=True):
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask.sum() == len(rows) * len(cols)  # one rectangle
        assert torch.allclose(img[:, mask], fill[:, None].expand(3, int(mask.sum())))


def test_color_jitter_scales_brightness_and_contrast_per_image_within_the_factors() -> None:
    x = torch.rand(300, 3, 8, 8) * 0.5 + 0.25
    bright = color_jitter(x, 0.2, 0.0, 0.0, gen())
    ratio = bright.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.2 + 1e-5 and ratio.std() > 0.05
    contrast = color_jitter(x, 0.0, 0.2, 0.0, gen())
    spread = contrast.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert spread.min() >= 0.8 - 1e-4 and spread.max() <= 1.2 + 1e-4
    grey = torch.rand(10, 1, 8, 8)
    assert torch.equal(color_jitter(grey, 0.0, 0.0, 0.5, gen()), grey)  # saturation: no-op on grey images


def test_augment_is_seeded_keeps_shapes_and_can_be_switched_off() -> None:
    spec = AugmentSpec.from_config(SPEC_CFG)
    x = torch.rand(4, 10, 3, 16, 16)  # [episodes, images, C, H, W]
    a, b = augment(x, spec, [0.5, 0.5, 0.5], gen(3)), augment(x, spec, [0.5, 0.5, 0.5], gen(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert not torch.equal(a, augment(x, spec, [0.5, 0.5, 0.5], gen(4)))
    assert a.min() >= 0 and a.max() <= 1
    off = AugmentSpec.from_config({**SPEC_CFG, "enabled": False})
    assert torch.equal(augment(x, off, [0.5] * 3, gen()), x)


@pytest.mark.parametrize("hflip", [True, False])
def test_flip_only_when_asked(hflip: bool) -> None:
    cfg = {
        **SPEC_CFG,
        "crop_padding": 0,
        "hflip": hflip,
        "color_jitter": {"brightness": 0, "contrast": 0, "saturation": 0},
        "erasing": {**SPEC_CFG["erasing"], "p": 0.0},
    }
    x = torch.arange(16.0).view(1, 1, 1, 16).expand(100, 1, 4, 16) / 16
    out = augment(x, AugmentSpec.from_config(cfg), [0.0], gen())
    flipped = torch.isclose(out, x.flip(-1)).flatten(1).all(1)
    same = torch.isclose(out, x).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert (0.3 < flipped.float().mean() < 0.7) if hflip else not flipped.any()
