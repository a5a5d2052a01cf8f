"""The pseudo dataset of one regeneration round (spec §4.4): images from the zoo, guided by the class-learner, with an
explicit label per image (no folder-name parsing).

* `fixed`: images kept lossless (uint8 tensors), label = pseudo class index.
* `faithful`: the original's round trip through JPEG quality 75, and its labels: folders `class0..class{C-1}` were
  labelled by their position in *lexicographic* order (class0, class1, class10, class11, ...), while guidance used
  the numeric index (§8 B2).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metadiff.data.images.episodes import Episodes, EpisodeShape, draw_episode, group_by_class
from metadiff.dfml.guidance import check_compat, class_log_prob, guidance_target
from metadiff.diffusion.sampling import classifier_guidance
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.utils.io import atomic_path


def lexicographic_labels(n_classes: int) -> list[int]:
    """label of pseudo class i when class folders are sorted as strings: position of 'class{i}' in that order."""
    order = sorted(range(n_classes), key=lambda i: f"class{i}")
    position = {cls: pos for pos, cls in enumerate(order)}
    return [position[i] for i in range(n_classes)]


def jpeg_round_trip(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """uint8 [N, C, H, W] through JPEG at `quality` (PIL, as torchvision's save_image did) and back."""
    out = torch.empty_like(images)
    for i, img in enumerate(images):
        mode = "L" if img.shape[0] == 1 else "RGB"
        pil = Image.fromarray(img.squeeze(0).numpy() if mode == "L" else img.permute(1, 2, 0).numpy(), mode)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        decoded = torch.from_numpy(np.array(Image.open(buf).convert(mode)))
        out[i] = decoded.unsqueeze(0) if mode == "L" else decoded.permute(2, 0, 1)
    return out


@dataclass
class PseudoData:
    images: torch.Tensor     # uint8 [N, C, H, W]
    labels: torch.Tensor     # the label the meta-model trains on [N]
    classes: torch.Tensor    # the pseudo class that was asked for (guidance) [N]
    models: torch.Tensor     # zoo member that generated each image [N]
    round: int

    def __len__(self) -> int:
        return len(self.labels)

    def episodes(self, shape: EpisodeShape, n: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> Episodes:
        """`n` random training episodes (spec §2.5: N classes, K support + Q queries each) as [0, 1] images;
        `query_classes` are the queries' pseudo labels for the global head."""
        by_class = group_by_class(self.labels, shape, f"pseudo data of round {self.round}")
        idx = torch.stack([draw_episode(by_class, shape, generator) for _ in range(n)])      # [n, N*(K+Q)]
        images = self.images[idx].to(device).float().div_(255)
        n_support = shape.n_way * shape.k_shot
        ways = torch.arange(shape.n_way, device=device)
        return Episodes(images[:, :n_support], ways.repeat_interleave(shape.k_shot).expand(n, -1),
                        images[:, n_support:], ways.repeat_interleave(shape.n_query).expand(n, -1),
                        self.labels[idx[:, n_support:]].to(device))

    def save(self, path: Path) -> None:
        """Tensors plus the explicit label manifest, written atomically."""
        with atomic_path(path) as tmp:
            torch.save({"images": self.images, "labels": self.labels, "classes": self.classes, "models": self.models,
                        "round": self.round}, tmp)

    @classmethod
    def load(cls, path: Path) -> PseudoData:
        state = torch.load(path, weights_only=True)
        return cls(state["images"], state["labels"], state["classes"], state["models"], int(state["round"]))


@torch.no_grad()
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.mul(255).round().clamp(0, 255).to(torch.uint8).cpu()


def generate_pseudo_data(zoo: DiffusionZoo, backbone: torch.nn.Module, class_learner: torch.nn.Module,
                         per_class: int, batch_size: int, steps: int, scale: float, compat: str,
                         generator: torch.Generator, round_index: int = 0, spacing: str = "trailing") -> PseudoData:
    """`per_class` images of every pseudo class, each model's classes batched together, guided toward their class
    (scale 0: unguided; the labels then only say which zoo member made an image)."""
    check_compat(compat)
    wanted = torch.arange(len(zoo.class_map)).repeat_interleave(per_class)
    images, asked, made_by = [], [], []
    for k in range(zoo.n_models):
        mine = wanted[torch.isin(wanted, torch.tensor(zoo.classes_of(k)))]
        for start in range(0, len(mine), batch_size):
            classes = mine[start:start + batch_size]
            device = next(zoo.models[k].parameters()).device
            targets = torch.tensor([guidance_target(int(c), compat) for c in classes], device=device)
            guide = classifier_guidance(class_log_prob(backbone, class_learner, targets, compat), scale,
                                        zoo.schedule) if scale else None
            # fixed: x0_hat clipped after guidance too (else the first `trailing` step explodes, see sample()); the
            # original did not re-clip and, with its `leading` spacing, never needed to
            images.append(to_uint8(zoo.sample(k, len(classes), steps, generator, spacing=spacing, guidance=guide,
                                              reclip_guided=compat == "fixed")))
            asked.append(classes)
            made_by.append(torch.full((len(classes),), k))
    pixels, classes = torch.cat(images), torch.cat(asked)
    if compat == "faithful":
        pixels = jpeg_round_trip(pixels)
        labels = torch.tensor(lexicographic_labels(len(zoo.class_map)))[classes]
    else:
        labels = classes.clone()
    return PseudoData(pixels, labels, classes, torch.cat(made_by), round_index)
