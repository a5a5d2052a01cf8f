"""Weights and data files read back whatever device wrote them (issue 31, fault 1).

A GPU run's `torch.save` records "cuda:0" for every tensor it saves from the GPU; a reader without `map_location` then
puts the zoo's members on the GPU of every rank before Lightning places anything, and a CPU-only reader fails.
`gpu_written.written_as_on_gpu` writes such files on this CPU machine."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gpu_written import saved_locations, written_as_on_gpu
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.nets.unet import ImageDenoiser
from metadiff.store import Artifact

UNET = {
    "block_out_channels": [8, 8],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D"] * 2,
    "up_block_types": ["UpBlock2D"] * 2,
    "norm_num_groups": 4,
}
CONV4 = {"name": "conv4", "in_channels": 1, "mean": [0.5], "std": [0.5], "width": 8, "depth": 2}


def tiny_zoo() -> DiffusionZoo:
    torch.manual_seed(0)
    models = [ImageDenoiser(8, 1, UNET).eval() for _ in range(2)]
    class_map = [{"class": c, "model": c // 2, "local": c % 2} for c in range(4)]
    return DiffusionZoo(
        models,
        NoiseSchedule.make("cosine", 1000),
        {"name": "cosine", "n_timesteps": 1000},
        class_map,
        [str(c) for c in range(4)],
        image_size=8,
        channels=1,
    )


def _artifact(path: Path) -> Artifact:
    path.mkdir(parents=True, exist_ok=True)
    return Artifact(path, {"fingerprint": "test"})


# each case: write the file as a GPU run would (inside written_as_on_gpu), then read it; returns what was read and
# the reference tensors it must equal
def _zoo(tmp: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from metadiff.stages.diffusion_zoo import load_zoo, save_zoo

    zoo = tiny_zoo()
    with written_as_on_gpu():
        save_zoo(zoo, _artifact(tmp).path)
    loaded = load_zoo(_artifact(tmp))
    return [p for m in loaded.models for p in m.parameters()], [p for m in zoo.models for p in m.parameters()]


def _unet(tmp: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from metadiff.stages.diffusion_unet import SPEC, WEIGHTS, load_unet

    model = tiny_zoo().models[0]
    with written_as_on_gpu():
        torch.save(model.state_dict(), _artifact(tmp).path / WEIGHTS)
    (tmp / SPEC).write_text(json.dumps({"config": model.config, "schedule": {}, "classes": [0, 1]}))
    return list(load_unet(_artifact(tmp)).parameters()), list(model.parameters())


def _classifier(tmp: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from metadiff.stages.classifier import SPEC, WEIGHTS, ImageClassifier, load_classifier

    net = ImageClassifier(CONV4, 4, "batchnorm")
    with written_as_on_gpu():
        torch.save(net.state_dict(), _artifact(tmp).path / WEIGHTS)
    (tmp / SPEC).write_text(json.dumps(net.spec))
    return list(load_classifier(_artifact(tmp)).state_dict().values()), list(net.state_dict().values())


def _meta_model(tmp: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from metadiff.stages.dfml import SPEC, WEIGHTS, build_meta_model, load_meta_model

    spec = {"backbone": CONV4, "n_classes": 4, "head_norm": "none", "scale_cls": 7.0}
    net = build_meta_model(spec)
    with written_as_on_gpu():
        torch.save(net.state_dict(), _artifact(tmp).path / WEIGHTS)
    (tmp / SPEC).write_text(json.dumps(spec))
    return list(load_meta_model(_artifact(tmp)).state_dict().values()), list(net.state_dict().values())


def _pseudo_data(tmp: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from metadiff.dfml.pseudo_data import PseudoData

    classes = torch.arange(4).repeat_interleave(2)
    data = PseudoData(
        torch.randint(0, 255, (8, 1, 4, 4), dtype=torch.uint8), classes.clone(), classes, classes // 2, round=1
    )
    with written_as_on_gpu():
        data.save(tmp / "round1.pt")
    loaded = PseudoData.load(tmp / "round1.pt")
    return [loaded.images, loaded.labels, loaded.ranks], [data.images, data.labels, data.ranks]


def _glyphs(tmp: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from omegaconf import OmegaConf

    from metadiff.config.typed import as_spec
    from metadiff.data.images.glyphs import GlyphSpec, load_glyphs

    render = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/data/glyphs.yaml").source.render)
    spec = as_spec(GlyphSpec, {**render, "n_classes": 2, "images_per_class": 2, "image_size": 8}, "render")
    rendered = load_glyphs(spec, tmp)  # renders and caches; the cache is then rewritten as a GPU job's
    (cache,) = tmp.glob("glyphs-*.pt")
    with written_as_on_gpu():
        torch.save(rendered, cache)
    loaded = load_glyphs(spec, tmp)
    return [v for v in loaded.values() if torch.is_tensor(v)], [v for v in rendered.values() if torch.is_tensor(v)]


READERS: dict[str, Callable[[Path], tuple[list[torch.Tensor], list[torch.Tensor]]]] = {
    "zoo": _zoo,
    "unet": _unet,
    "classifier": _classifier,
    "dfml_meta_model": _meta_model,
    "pseudo_data": _pseudo_data,
    "glyphs": _glyphs,
}


@pytest.mark.parametrize("name", list(READERS))
def test_a_gpu_written_file_reads_onto_the_cpu(name: str, tmp_path: Path) -> None:
    assert not torch.cuda.is_available(), "this test shows the CPU-only reader of a GPU-written file"
    got, expected = READERS[name](tmp_path)
    assert got and len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b)


class _DeviceToHost(TorchFunctionMode):
    """Stands in for a GPU's device -> host copy on a CPU machine: the zoo lives on the "meta" device, and
    `.cpu()` / `.to(cpu)` of a meta tensor gives a CPU tensor of its shape (a meta tensor has no data to copy)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in (torch.Tensor.cpu, torch.Tensor.to) and args[0].is_meta and _asks_for_cpu(func, args, kwargs):
            return torch.zeros(args[0].shape, dtype=args[0].dtype)
        return func(*args, **kwargs)


def _asks_for_cpu(func: Callable, args: tuple, kwargs: dict) -> bool:
    if func is torch.Tensor.cpu:
        return True
    wanted = [*args[1:], kwargs.get("device")]
    return any(isinstance(w, str | torch.device) and torch.device(w).type == "cpu" for w in wanted)


def test_save_zoo_of_a_zoo_on_a_device_writes_cpu_tensors(tmp_path: Path) -> None:
    """`DiffusionZoo.to(device)` moves the members; their files must still hold CPU tensors (a file that says
    "cuda:0" puts 13 x 484 MB on every rank's first GPU when a later stage reads it without map_location)."""
    from metadiff.stages.diffusion_zoo import save_zoo

    zoo = tiny_zoo().to("meta")
    with _DeviceToHost():
        save_zoo(zoo, tmp_path)
    files = sorted(tmp_path.glob("unet_*.pt"))
    assert len(files) == 2
    for path in files:
        loaded = torch.load(path, weights_only=True)
        assert {t.device.type for t in loaded.values()} == {"cpu"}, path
        assert saved_locations(path) == {"cpu"}
