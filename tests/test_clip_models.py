"""open_clip models build offline, load local checkpoints, and reject wrong ones in one clear line."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from metadiff.features.clip_models import create_clip, register_model_configs


def test_custom_config_is_registered_and_builds_real_open_clip_towers() -> None:
    register_model_configs()
    assert "metadiff-tiny-vit" in open_clip.list_models()
    bundle = create_clip("metadiff-tiny-vit")
    assert isinstance(bundle.model, open_clip.CLIP)
    assert bundle.image_size == 48
    tokens = bundle.tokenizer(["the circle is red"])
    assert tokens.shape == (1, 24)
    with torch.no_grad():
        assert bundle.model.encode_image(torch.zeros(2, 3, 48, 48)).shape == (2, 128)
        assert bundle.model.encode_text(tokens).shape == (1, 128)


def test_local_checkpoint_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = create_clip("metadiff-tiny-vit")
    path = tmp_path / "tiny.pt"
    torch.save(first.model.state_dict(), path)
    torch.manual_seed(1)
    second = create_clip("metadiff-tiny-vit", pretrained=path)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_for_wrong_architecture_is_one_line_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(create_clip("metadiff-tiny-vit").model.state_dict(), path)
    with pytest.raises(ValueError) as err:
        create_clip("RN50", pretrained=path)
    message = str(err.value)
    assert str(path) in message and "'RN50'" in message and "\n" not in message


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no download is attempted"):
        create_clip("metadiff-tiny-vit", pretrained=tmp_path / "absent.pt")
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(ValueError, match=str(bad)):
        create_clip("metadiff-tiny-vit", pretrained=bad)


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Nope'"):
        create_clip("ViT-Nope")
