"""Stage `features`: image, question and answer embeddings from any open_clip model into a feature store.

Runs as Lightning's predict loop, so devices, DDP and precision come from the trainer config. Each rank writes the
rows it computed into shard files of its own (never a file another rank writes: ranks may be on different nodes of a
network filesystem); rank 0 merges them and commits the store once every rank has finished and every row is there.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from metadiff.config import ConfigError
from metadiff.data.pinning import pin_memory
from metadiff.data.sources import META_SPLITS, ImageNormalizer, TaskSource, task_prompts
from metadiff.eval.baselines import baseline_report
from metadiff.eval.tables import results_table
from metadiff.features.clip_models import ClipBundle, create_clip, image_preprocessing
from metadiff.features.store import FeatureStore, FeatureStoreBuilder, build_index, check_existing
from metadiff.stages.base import Stage
from metadiff.stages.clip_pretrain import load_clip_weights_path
from metadiff.store import Artifact
from metadiff.utils.hashing import cached_file_sha256, fingerprint

log = logging.getLogger(__name__)
TABLE_OF_LOADER = ("image", "question", "answer")


class TextDataset(Dataset):
    """Texts tokenised on access; yields (tokens, row)."""

    def __init__(self, texts: Sequence[str], tokenizer: Any):
        self.texts, self.tokenizer = list(texts), tokenizer

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tokenizer([self.texts[i]])[0], i


def store_contents(source: TaskSource) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """What a store holds for a benchmark: all images, every task question, every task's answer prompts (the tasks of
    every split, meta-val included: the same contents whatever the meta-val split)."""
    tasks = [task for split in META_SPLITS for task in source.tasks(split)]
    questions = [t.question for t in tasks]
    return source.image_names(), questions, {t.question: task_prompts(source, t) for t in tasks}


def weights_description(bundle: ClipBundle) -> dict[str, Any]:
    """The weights' part of a store's key: the CONTENT of the file that was read (so a file replaced at the same path
    gives a new store, and a moved one does not), plus for tags and hub repos the name, which also fixes the image
    normalisation. A local file's entry is the same as before `model.pretrained` existed, so old stores stay valid."""
    weights = bundle.weights
    if weights.path is None:
        raise ConfigError(f"features: '{bundle.arch}' has random weights (model.pretrained=null and no upstream clip)")
    description: dict[str, Any] = {"checkpoint_sha256": cached_file_sha256(weights.path)}
    if weights.kind != "file":
        description["pretrained"] = weights.name
        description["image_preprocessing"] = [bundle.image_size, list(bundle.mean), list(bundle.std)]
    return description


class FeatureSourceDataModule(pl.LightningDataModule):
    """Three predict loaders (images, questions, answer prompts) over one benchmark."""

    def __init__(
        self,
        source: TaskSource,
        arch: str,
        batch_size: int = 256,
        text_batch_size: int = 512,
        num_workers: int = 0,
        pretrained: str | None = None,
        pin_memory: bool = False,
    ):
        """`pretrained`: the model's `model.pretrained`, because tags and hub repos carry their own image size;
        None (upstream weights, local files) uses the architecture's. The image loader yields uint8 images, sized
        for the model; `FeatureExtractor` normalises them on the device. `pin_memory`: pin the batches when they go
        to a CUDA device (`metadiff.data.pinning`)."""
        super().__init__()
        self.source, self.arch, self.pretrained = source, arch, pretrained
        self.batch_size, self.text_batch_size, self.num_workers = batch_size, text_batch_size, num_workers
        self.pin_memory = pin_memory

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str) -> None:
        import open_clip

        from metadiff.features.clip_models import register_model_configs

        register_model_configs()
        size, _, _ = image_preprocessing(self.arch, self.pretrained)
        tokenizer = open_clip.get_tokenizer(self.arch)
        images, questions, answers = store_contents(self.source)
        self.datasets = [
            self.source.raw_image_dataset(images, size),
            TextDataset(questions, tokenizer),
            TextDataset([p for q in questions for p in answers[q]], tokenizer),
        ]

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per table; after an interrupted run only the rows still pending (asked from the module)."""
        sizes = (self.batch_size, self.text_batch_size, self.text_batch_size)
        pending = getattr(self.trainer.lightning_module, "pending_rows", None) if self.trainer else None
        datasets = [
            Subset(ds, pending[table].tolist()) if pending is not None else ds
            for ds, table in zip(self.datasets, TABLE_OF_LOADER, strict=True)
        ]
        pin = pin_memory(self.trainer, self.pin_memory)
        return [
            DataLoader(ds, batch_size=bs, num_workers=self.num_workers, persistent_workers=False, pin_memory=pin)
            for ds, bs in zip(datasets, sizes, strict=True)
        ]


def baseline_table(report: dict[str, float]) -> str:
    """The results table of a store: the baselines on its meta-test tasks (`baseline_report`'s keys)."""
    rows = [
        ("CLIP zero-shot (image vs answer prompts)", "meta_test/zeroshot_acc"),
        ("prototype (support-set answer means)", "meta_test/prototype_acc"),
        ("per-task majority answer", "meta_test/majority_acc"),
        ("chance (mean 1 / answers)", "meta_test/chance"),
    ]
    return results_table("accuracy on meta-test tasks from the feature store (mean +- 95% CI):", report, rows)


class FeatureExtractor(Stage, name="features"):
    """Encodes everything a benchmark needs once; a rerun with the same model and data reuses the store."""

    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """Without `model.pretrained`, the weights of the small embedded CLIP (upstream `clip`)."""
        return ("clip",) if model.get("pretrained") is None else ()

    def __init__(
        self,
        source: TaskSource,
        arch: str,
        store_dir: str,
        pretrained: str | None = None,
        normalize: bool = False,
        precision: str | int = "32-true",
        upstream: dict[str, Artifact] | None = None,
    ):
        super().__init__()
        if pretrained is None:  # the embedded CLIP's weights (required_upstreams)
            pretrained = str(load_clip_weights_path(self.upstream_artifact(upstream, "clip")))
        self.source, self.normalize = source, normalize
        self.bundle = create_clip(arch, pretrained)
        self.model: Any = self.bundle.model.eval()  # an open_clip CLIP (untyped): encode_image, encode_text
        # the loader's images are uint8: ToTensor + Normalize on the device, with this model's mean and std
        self.image_normalizer = ImageNormalizer(self.bundle.mean, self.bundle.std)
        self.description = {
            "arch": arch,
            **weights_description(self.bundle),
            "data": f"{source.name}:{source.fingerprint()}",
            "normalize": normalize,
            "precision": str(precision),  # bf16 features differ slightly from fp32 ones: never mix them up
        }
        self.store_fingerprint = fingerprint(self.description)
        # "{fingerprint}" in store_dir keys the folder by model + data + precision, so switching any of them builds
        # a new store beside the old one; a fixed folder built for something else is an error (check_existing).
        self.store_dir = Path(store_dir.format(fingerprint=self.store_fingerprint[:12]))
        self._image_clock: list[float] = []
        self._n_images = 0

    def stage_complete(self) -> bool:
        """True if the store already exists for this model and data (raises if it exists for other ones)."""
        done = check_existing(self.store_dir, self.store_fingerprint, self.description)
        if done:
            log.info("feature store %s is up to date: reusing it", self.store_dir)
            self.summary_metrics.update(
                baseline_report(self.source.tasks("meta_test"), FeatureStore(self.store_dir), "meta_test")
            )
            self.set_results_text(baseline_table(self.summary_metrics))
        return done

    def setup(self, stage: str) -> None:
        """Open (or resume) the partial store before the dataloaders exist, so they only load pending rows."""
        if stage != "predict":
            return
        images, questions, answers = store_contents(self.source)
        index = build_index(images, questions, answers)
        with torch.no_grad():
            dim = int(self.model.encode_text(self.bundle.tokenizer(["x"])).shape[-1])
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        build = functools.partial(
            FeatureStoreBuilder, self.store_dir, dim, index, self.store_fingerprint, rank, world_size
        )
        if rank == 0:  # prepares the folder (fresh or resumed) before the others attach
            self.builder = build()
        self.trainer.strategy.barrier()
        if rank != 0:
            self.builder = build()
        self.pending_rows = {table: self.builder.pending(table) for table in TABLE_OF_LOADER}
        if self.builder.resumed:
            done = {t: self.builder.rows[t] - len(rows) for t, rows in self.pending_rows.items()}
            log.info("resuming feature extraction in %s: already computed %s", self.builder.partial, done)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        inputs, rows = batch
        table = TABLE_OF_LOADER[dataloader_idx]
        if table == "image":
            if not self._image_clock:
                self._image_clock.append(time.perf_counter())
            # float32 as the workers made it before, then what the precision plugin does to float inputs (bf16-true:
            # bf16; mixed precision: unchanged); Lightning converted only the uint8 batch, which it leaves alone
            emb = self.model.encode_image(self.trainer.precision_plugin.convert_input(self.image_normalizer(inputs)))
            self._n_images += inputs.shape[0]
        else:
            emb = self.model.encode_text(inputs)
        emb = emb.float()
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        self.builder.write(table, rows.cpu().numpy(), emb.cpu().numpy())
        if table == "image":
            self._image_clock[1:] = [time.perf_counter()]

    def on_predict_end(self) -> None:
        self.builder.finish()  # this rank's shard list; rank 0 commits once every rank has written its own
        self.trainer.strategy.barrier()
        if len(self._image_clock) == 2:
            rate = self._n_images / max(self._image_clock[1] - self._image_clock[0], 1e-9)
            self.summary_metrics["features/images_per_s"] = rate
            log.info("image features: %d images at %.1f images/s (this rank)", self._n_images, rate)
        if self.fast_dev_run:  # a smoke test saw one batch per loader: never commit a partial store
            if self.trainer.is_global_zero:
                self.builder.abort()
            log.warning("fast_dev_run: feature store not committed (only one batch per table was computed)")
            self.artifact_ready = False
        elif self.trainer.is_global_zero:
            store = self.builder.commit(
                self.store_fingerprint,
                self.description,
                {"images_per_s": self.summary_metrics.get("features/images_per_s")},
            )
            self.summary_metrics["features/n_images"] = float(store.tables["image"].shape[0])
            self.summary_metrics["features/n_questions"] = float(store.tables["question"].shape[0])
            self.summary_metrics.update(baseline_report(self.source.tasks("meta_test"), store, "meta_test"))
            self.set_results_text(baseline_table(self.summary_metrics))
            log.info("feature store written: %s", self.store_dir)
        del self.builder  # rebuilt by the next predict's setup

    def write_artifact(self, directory: Path) -> None:
        # relative to the artifact (both live under paths.root_dir), so a copied outputs tree finds its own store
        store_dir = os.path.relpath(self.store_dir.resolve(), directory.resolve())
        (directory / "features.json").write_text(
            json.dumps({"store_dir": store_dir, "fingerprint": self.store_fingerprint, **self.description})
        )
