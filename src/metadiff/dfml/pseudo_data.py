"""The pseudo dataset of one regeneration round (spec §4.4): images from the zoo, guided by the class-learner, with an
explicit label per image (no folder-name parsing).

* `fixed`: images kept lossless (uint8 tensors), label = pseudo class index.
* `faithful`: the original's round trip through JPEG quality 75, and its labels: folders `class0..class{C-1}` were
  labelled by their position in *lexicographic* order (class0, class1, class10, class11, ...), while guidance used
  the numeric index (§8 B2).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metadiff.data.images.episodes import Episodes, EpisodeShape, draw_episode, group_by_class
from metadiff.data.images.splits import ImageSplit
from metadiff.dfml.guidance import check_compat, class_log_prob, guidance_target
from metadiff.diffusion.sampling import classifier_guidance
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.utils.io import atomic_path
from metadiff.utils.tensor_files import load_tensors, save_tensors


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
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # the label the meta-model trains on [N]
    classes: torch.Tensor  # the pseudo class that was asked for (guidance) [N]
    models: torch.Tensor  # zoo member that generated each image [N]
    round: int
    # DDP rank that generated each image [N] (all 0 in one process); None at construction means all 0, which
    # __post_init__ fills in, so the attribute is always a Tensor
    ranks: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.ranks is None:
            self.ranks = torch.zeros_like(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def episodes(
        self, shape: EpisodeShape, n: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> Episodes:
        """`n` random training episodes (spec §2.5: N classes, K support + Q queries each) as [0, 1] images;
        `query_classes` are the queries' pseudo labels for the global head."""
        by_class = group_by_class(self.labels, shape, f"pseudo data of round {self.round}")
        idx = torch.stack([draw_episode(by_class, shape, generator) for _ in range(n)])  # [n, N*(K+Q)]
        images = self.images[idx].to(device).float().div_(255)
        n_support = shape.n_way * shape.k_shot
        ways = torch.arange(shape.n_way, device=device)
        return Episodes(
            images[:, :n_support],
            ways.repeat_interleave(shape.k_shot).expand(n, -1),
            images[:, n_support:],
            ways.repeat_interleave(shape.n_query).expand(n, -1),
            self.labels[idx[:, n_support:]].to(device),
        )

    def save(self, path: Path) -> None:
        """Tensors plus the explicit label manifest, written atomically."""
        with atomic_path(path) as tmp:
            save_tensors(
                {
                    "images": self.images,
                    "labels": self.labels,
                    "classes": self.classes,
                    "models": self.models,
                    "round": self.round,
                    "ranks": self.ranks,
                },
                tmp,
            )

    @classmethod
    def load(cls, path: Path) -> PseudoData:
        state = load_tensors(path)
        return cls(
            state["images"], state["labels"], state["classes"], state["models"], int(state["round"]), state.get("ranks")
        )


@torch.no_grad()
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.mul(255).round().clamp(0, 255).to(torch.uint8).cpu()


# one generation chunk: a batch of one zoo member's pseudo classes, as the 1-process run batches them
@dataclass(frozen=True)
class Chunk:
    index: int  # position in the round's plan; also what seeds the chunk's generator
    model: int  # zoo member that samples it
    classes: tuple[int, ...]  # the pseudo class asked for, per image


def plan_chunks(zoo: DiffusionZoo, per_class: int, batch_size: int) -> list[Chunk]:
    """The round's work in the order the images are stored: each member's classes (`per_class` images each, class by
    class), cut into batches of `batch_size`. The plan, not the world size, fixes every batch."""
    wanted = torch.arange(len(zoo.class_map)).repeat_interleave(per_class)
    chunks: list[Chunk] = []
    for k in range(zoo.n_models):
        mine = wanted[torch.isin(wanted, torch.tensor(zoo.classes_of(k)))].tolist()
        for start in range(0, len(mine), batch_size):
            chunks.append(Chunk(len(chunks), k, tuple(mine[start : start + batch_size])))
    return chunks


def split_chunks(chunks: list[Chunk], world_size: int) -> list[list[int]]:
    """rank -> the chunk indices it generates (ascending): whole chunks, largest first to the rank with the fewest
    images so far (ties to the lower rank), so the shares differ by at most one chunk's images. Depends only on the
    plan and the world size: every rank computes the same split without talking to the others."""
    load = [0] * world_size
    share: list[list[int]] = [[] for _ in range(world_size)]
    for chunk in sorted(chunks, key=lambda c: (-len(c.classes), c.index)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += len(chunk.classes)
        share[rank].append(chunk.index)
    return [sorted(s) for s in share]


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk `index` of the round seeded `seed` (a hash: nearby rounds and chunks share no stream)."""
    digest = hashlib.sha256(f"metadiff.pseudo_data/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63: any torch.Generator seed


def generate_chunks(
    zoo: DiffusionZoo,
    backbone: torch.nn.Module,
    class_learner: torch.nn.Module,
    chunks: list[Chunk],
    steps: int,
    scale: float,
    compat: str,
    seed: int,
    spacing: str = "trailing",
) -> list[torch.Tensor]:
    """The uint8 images of each of `chunks` (in the given order), each from its own generator `chunk_seed(seed,
    chunk.index)`; `faithful`: after their JPEG round trip (per image, so a rank can do it for its own chunks)."""
    check_compat(compat)
    out = []
    for chunk in chunks:
        device = next(zoo.models[chunk.model].parameters()).device
        targets = torch.tensor([guidance_target(c, compat) for c in chunk.classes], device=device)
        guide = (
            classifier_guidance(class_log_prob(backbone, class_learner, targets, compat), scale, zoo.schedule)
            if scale
            else None
        )
        generator = torch.Generator().manual_seed(chunk_seed(seed, chunk.index))
        # fixed: x0_hat clipped after guidance too (else the first `trailing` step explodes, see sample()); the
        # original did not re-clip and, with its `leading` spacing, never needed to
        images = to_uint8(
            zoo.sample(
                chunk.model,
                len(chunk.classes),
                steps,
                generator,
                spacing=spacing,
                guidance=guide,
                reclip_guided=compat == "fixed",
            )
        )
        out.append(jpeg_round_trip(images) if compat == "faithful" else images)
    return out


def assemble_pseudo_data(
    zoo: DiffusionZoo,
    chunks: list[Chunk],
    images: dict[int, torch.Tensor],
    compat: str,
    round_index: int,
    made_on: dict[int, int] | None = None,
) -> PseudoData:
    """The round's `PseudoData` from every chunk's images (`images[chunk.index]`), in plan order; `made_on`:
    chunk index -> the rank that generated it (all 0 if not given)."""
    missing = [c.index for c in chunks if c.index not in images]
    if missing:
        raise ValueError(f"pseudo data of round {round_index}: no images for chunks {missing}")
    classes = torch.tensor([c for chunk in chunks for c in chunk.classes], dtype=torch.long)
    if compat == "faithful":
        labels = torch.tensor(lexicographic_labels(len(zoo.class_map)))[classes]
    else:
        labels = classes.clone()
    models = torch.cat([torch.full((len(c.classes),), c.model) for c in chunks])
    ranks = torch.cat([torch.full((len(c.classes),), (made_on or {}).get(c.index, 0)) for c in chunks])
    return PseudoData(torch.cat([images[c.index] for c in chunks]), labels, classes, models, round_index, ranks)


def generate_pseudo_data(
    zoo: DiffusionZoo,
    backbone: torch.nn.Module,
    class_learner: torch.nn.Module,
    per_class: int,
    batch_size: int,
    steps: int,
    scale: float,
    compat: str,
    seed: int,
    round_index: int = 0,
    spacing: str = "trailing",
    rank: int = 0,
    world_size: int = 1,
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PseudoData:
    """`per_class` images of every pseudo class, each model's classes batched together (`plan_chunks`), guided
    toward their class (scale 0: unguided; the labels then only say which zoo member made an image).

    Under DDP (`world_size` > 1) each rank generates only its share of the chunks (`split_chunks`) and the shares
    are gathered with `all_gather` (a same-shape tensor per rank -> [world_size, ...] on every rank, e.g.
    `LightningModule.all_gather`): every rank ends with the whole round, in plan order. One process makes no
    distributed call.

    Why one generator per chunk, seeded from (`seed`, chunk index): with one generator for the whole round, the
    noise of a batch depends on how many numbers the batches before it drew, so only the process that generated
    every earlier batch could generate it. Per-chunk generators make each chunk a function of (seed, chunk, guide
    weights) alone, so the round is the same, to the bit, whichever rank generates which chunk and however many
    ranks there are. The chunks are whole batches of the plan, never re-batched: under `faithful` the class-learner
    normalises with batch statistics (§8 B9), so a sample's guidance depends on the other samples of its batch;
    under `fixed` it does not (class_learner_norm none), but keeping the batches also keeps every kernel's shapes,
    and so its floating-point results, those of the 1-process run."""
    check_compat(compat)
    chunks = plan_chunks(zoo, per_class, batch_size)
    if world_size == 1:
        generated = generate_chunks(zoo, backbone, class_learner, chunks, steps, scale, compat, seed, spacing)
        return assemble_pseudo_data(
            zoo, chunks, {c.index: x for c, x in zip(chunks, generated, strict=True)}, compat, round_index
        )
    if all_gather is None:
        raise ValueError(f"generate_pseudo_data on {world_size} ranks needs an all_gather")
    shares = split_chunks(chunks, world_size)
    mine = generate_chunks(
        zoo, backbone, class_learner, [chunks[i] for i in shares[rank]], steps, scale, compat, seed, spacing
    )
    rows = [sum(len(chunks[i].classes) for i in share) for share in shares]
    image_shape = (zoo.channels, zoo.image_size, zoo.image_size)
    local = torch.zeros((max(rows), *image_shape), dtype=torch.uint8)  # padded: all_gather wants one shape
    if mine:
        local[: rows[rank]] = torch.cat(mine)
    gathered = all_gather(local).cpu()  # [world_size, max(rows), C, H, W]
    images: dict[int, torch.Tensor] = {}
    made_on: dict[int, int] = {}
    for r, share in enumerate(shares):
        start = 0
        for i in share:
            n = len(chunks[i].classes)
            images[i], made_on[i] = gathered[r, start : start + n], r
            start += n
    return assemble_pseudo_data(zoo, chunks, images, compat, round_index, made_on)


def real_pseudo_data(
    split: ImageSplit, class_map: list[dict[str, int]], per_class: int, round_index: int
) -> PseudoData:
    """The positive control of the pipeline (not data-free): the first `per_class` real meta-train images of every
    class the zoo covers, labelled with its pseudo class. A meta-model trained on these with the same budget is what
    dfml would reach if the zoo's guided samples were the real classes, so `reference - this` is what the training
    budget and class coverage cost and `this - dfml` what the synthetic data costs."""
    images, labels = [], []
    for pseudo_class, entry in enumerate(class_map):
        idx = split.indices_of([entry["class"]])[:per_class]
        if len(idx) < per_class:
            raise ValueError(
                f"model.generation.per_class={per_class}: meta-train class {entry['class']} has only {len(idx)} images"
            )
        images.append(torch.stack([split[int(i)][0] for i in idx]))
        labels.append(torch.full((per_class,), pseudo_class))
    classes = torch.cat(labels)
    return PseudoData(
        to_uint8(torch.cat(images)),
        classes.clone(),
        classes,
        torch.tensor([class_map[c]["model"] for c in classes.tolist()]),
        round_index,
        torch.zeros(len(classes), dtype=torch.long),
    )
