"""Stage `clip`: train a small open_clip model on generated image-caption pairs (the embedded stand-in for
pretrained CLIP weights, which cannot be downloaded here), and score it zero-shot on Meta-VQA-shaped tasks.

Real open_clip towers and open_clip's own contrastive loss are used; only the data is ours.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence, Sized
from pathlib import Path
from typing import Any, Protocol, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from open_clip.loss import ClipLoss
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from metadiff.data import global_batch
from metadiff.data.samplers import StepPositionMixin
from metadiff.data.sources import TaskSource, task_prompts
from metadiff.eval.stats import mean_ci95
from metadiff.eval.tables import results_table
from metadiff.eval.zeroshot import encode_texts, per_task_accuracy, split_by_task
from metadiff.features.clip_models import CLIP_WEIGHTS, ClipBundle, context_length, create_clip, register_model_configs
from metadiff.stages.base import Stage
from metadiff.store import Artifact
from metadiff.utils.distributed import gather_rows

CLIP_INFO = "clip.json"


class ZeroShotEvalSet:
    """The tasks scored zero-shot in one loop, with the distinct images they use."""

    def __init__(self, source: TaskSource, split: str, max_tasks: int | None, image_size: int, mean, std):
        tasks = source.tasks(split)
        self.tasks = tasks[:max_tasks] if max_tasks else tasks
        self.names = sorted({name for t in self.tasks for name, _ in t.test})
        self.row = {name: i for i, name in enumerate(self.names)}
        self.prompts = [task_prompts(source, t) for t in self.tasks]
        self.dataset = source.image_dataset(self.names, image_size, mean, std)


class CaptionSource(TaskSource, Protocol):
    """A benchmark that also makes image-caption pairs to pretrain CLIP on (the generated twin, `data=synthvqa`)."""

    def caption_pairs(
        self, n_pairs: int, seed: int, tokenize: Callable, mean: Sequence[float], std: Sequence[float]
    ) -> Dataset: ...


class ClipEvalData(Protocol):
    """What the `clip` stage reads of its datamodule (`ClipPairsDataModule`, `Stage.datamodule_view`)."""

    eval_sets: dict[str, ZeroShotEvalSet]


class ClipPairsDataModule(StepPositionMixin, pl.LightningDataModule):
    """Caption pairs for training; zero-shot task sets for validation (meta-train) and test (meta-test)."""

    def __init__(
        self,
        source: CaptionSource,
        arch: str,
        batch_size: int = 256,
        num_workers: int = 0,
        n_train_pairs: int = 50_000,
        caption_seed: int = 1,
        n_val_tasks: int | None = 200,
        eval_batch_size: int = 512,
        seed: int = 0,
    ):
        super().__init__()
        self.source, self.arch, self.seed = source, arch, seed
        self.batch_size, self.num_workers, self.eval_batch_size = batch_size, num_workers, eval_batch_size
        self.n_train_pairs, self.caption_seed, self.n_val_tasks = n_train_pairs, caption_seed, n_val_tasks
        self.eval_sets: dict[str, ZeroShotEvalSet] = {}

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str) -> None:
        import open_clip

        register_model_configs()
        cfg = open_clip.get_model_config(self.arch)
        size = cfg["vision_cfg"]["image_size"]
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        if stage == "fit":
            tokenizer = open_clip.get_tokenizer(self.arch)
            self.train_set = self.source.caption_pairs(self.n_train_pairs, self.caption_seed, tokenizer, mean, std)
            self.eval_sets["val"] = ZeroShotEvalSet(self.source, "meta_train", self.n_val_tasks, size, mean, std)
        if stage in ("fit", "test", "validate"):
            self.eval_sets["test"] = ZeroShotEvalSet(self.source, "meta_test", None, size, mean, std)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """An evaluation loader: under DDP each rank scores every N-th row (Lightning's sampler is off,
        `trainer.use_distributed_sampler: false`, so that it does not wrap the training `StepOrder` a second time);
        the rows are gathered by index (`gather_rows`), so the pad that evens the shares writes a row twice, alike."""
        world = global_batch.world_size(self.trainer)
        sampler: DistributedSampler | None = None
        if world > 1:
            sampler = DistributedSampler(dataset, world, global_batch.rank(self.trainer), shuffle=shuffle)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        # the pairs of step k depend on (seed, k) only, so a resumed run trains on the same batches (StepOrder);
        # `data.batch_size` is global: each rank loads its share of the one-process batch (metadiff.data.global_batch)
        rank, world = global_batch.rank(self.trainer), global_batch.world_size(self.trainer)
        batch_size = global_batch.per_rank_batch(self.batch_size, world, "data.batch_size")
        n_pairs = len(cast(Sized, self.train_set))  # a map-style dataset: torch's `Dataset` declares no __len__
        order = self.step_order(n_pairs, batch_size, self.seed, rank=rank, world_size=world)
        return DataLoader(
            self.train_set,
            batch_size=batch_size,
            sampler=order,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_sets["val"].dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_sets["test"].dataset, self.eval_batch_size, shuffle=False)


class ClipPretrainModule(Stage, name="clip"):
    """open_clip model + ClipLoss; zero-shot Meta-VQA answer accuracy as validation/test metric."""

    def __init__(
        self,
        arch: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.05,
        prompt_batch_size: int = 512,
    ):
        super().__init__()
        # The optimizer factory is a Hydra partial, which `torch.load(weights_only=True)` refuses on resume; the full
        # config (optimizer included) is saved beside the run as resolved_config.yaml and sent to the loggers.
        self.save_hyperparameters(logger=False, ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.bundle: ClipBundle = create_clip(arch)
        self.model: Any = self.bundle.model  # an open_clip CLIP (untyped): encode_image, encode_text, logit_scale
        self.loss_fn = ClipLoss()
        self._eval_rows: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, stage: str) -> None:
        # open_clip's loss gathers the other ranks' features, so every rank scores the global batch's pairs, the
        # one-process loss. With their gradient (`gather_with_grad`): without it each rank's backward reaches only
        # its own features and DDP's mean gives 1/world of the one-process gradient (tests/test_parity.py).
        self.loss_fn = ClipLoss(
            world_size=self.trainer.world_size,
            rank=self.trainer.global_rank,
            gather_with_grad=self.trainer.world_size > 1,
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, tokens = batch
        out = self.model(images, tokens)
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", out["logit_scale"])
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        with torch.no_grad():  # CLIP's usual clamp of the learnable temperature
            self.model.logit_scale.clamp_(0, math.log(100))

    # -- zero-shot evaluation (validation on meta-train tasks, test on meta-test tasks) ----------------------------
    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, idx = batch
        self._eval_rows.append((idx, F.normalize(self.model.encode_image(images).float(), dim=-1)))

    def _eval_end(self, which: str) -> None:
        eval_set = self.datamodule_view(ClipEvalData).eval_sets[which]
        idx = torch.cat([i for i, _ in self._eval_rows]).to(self.device)
        emb = torch.cat([e for _, e in self._eval_rows])
        self._eval_rows.clear()
        images = gather_rows(self, idx, emb, len(eval_set.names))
        flat = [p for prompts in eval_set.prompts for p in prompts]
        texts = encode_texts(
            self.model.encode_text, self.bundle.tokenizer, flat, self.hparams["prompt_batch_size"], self.device
        )
        answers = split_by_task(texts, [len(p) for p in eval_set.prompts])
        acc = per_task_accuracy(eval_set.tasks, images.cpu(), eval_set.row, [a.cpu() for a in answers])
        mean, ci = mean_ci95(acc)
        chance = float(torch.tensor([1 / t.n_answers for t in eval_set.tasks]).mean())
        report = {f"{which}/zeroshot_acc": mean, f"{which}/zeroshot_acc_ci95": ci, f"{which}/chance": chance}
        self.log_dict(report, prog_bar=which == "val")
        if which == "test":
            rows = [
                ("zero-shot (image vs answer prompts)", "test/zeroshot_acc"),
                ("chance (mean 1 / answers)", "test/chance"),
            ]
            self.set_results_text(
                results_table("CLIP zero-shot accuracy on meta-test tasks (mean +- 95% CI):", report, rows)
            )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, floor = self.hparams["warmup_steps"], self.hparams["min_lr_ratio"]

        def schedule(step: int) -> float:  # linear warmup then cosine to floor, CLIP's usual recipe
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- artifact for later stages --------------------------------------------------------------------------------
    def write_artifact(self, directory: Path) -> None:
        torch.save(self.model.state_dict(), directory / CLIP_WEIGHTS)
        (directory / CLIP_INFO).write_text(
            json.dumps({"arch": self.hparams["arch"], "context_length": context_length(self.hparams["arch"])})
        )


def load_clip_weights_path(artifact: Artifact) -> Path:
    """The open_clip state dict a `clip` artifact holds (what `features` loads as its model's weights)."""
    return artifact.file(CLIP_WEIGHTS)
