"""Stage `adaptation`: the dataset of fine-tuned task latents (spec §4.4, "StoreFewShotLatent").

From the HNET's meta-learned init (or a VAE's encoding of it), every meta-train task's latent is fine-tuned K SGD
steps on a random view of the task, `rows` times with fresh views; every meta-train, meta-val and meta-test task is
also fine-tuned once on its `train` split (the evaluation latents: validation of the downstream stages reads
meta-val's, their test meta-test's). Batches of tasks are adapted at once by the few-shot
stage's inner loop.

Runs as Lightning's predict loop over *chunks* (a kind, a row and a slice of tasks). Each chunk is a pure function
of (seed, row, tasks), written atomically to `work_dir` as soon as it is done, so a killed run resumes with the
chunks still missing and ends with exactly the tensors of an uninterrupted run (the original re-read and re-wrote
one growing file per row, §8 B31). Rank 0 assembles the chunks into the artifact.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.adaptation import ADAPTATION_FILE, AdaptationData, task_list_hash
from metadiff.data.meta_vqa.batches import TaskBatch, TaskEpisodes, collate_tasks
from metadiff.data.meta_vqa.datamodule import MetaTaskDataModule
from metadiff.data.meta_vqa.tasks import Task
from metadiff.data.sources import META_SPLITS, TaskSource
from metadiff.eval.stats import mean_ci95
from metadiff.eval.tables import results_table
from metadiff.meta.inner_loop import InnerLoop
from metadiff.meta.latent import LatentLearner
from metadiff.nets.adapter import masked_task_accuracy
from metadiff.stages.base import MetaTaskData, Stage
from metadiff.stages.fewshot import load_hnet_latent_learner
from metadiff.store import Artifact
from metadiff.utils.hashing import fingerprint
from metadiff.utils.io import atomic_path, read_json, write_json
from metadiff.utils.tensor_files import load_tensors, save_tensors

log = logging.getLogger(__name__)
TRAIN = "train"  # chunk kind of the training rows; the evaluation kinds are the split names


@dataclass(frozen=True)
class AdaptationInnerSpec:
    """`model.inner`: SGD steps per task and their rate (null: the rate the upstream HNET was meta-trained with)."""

    steps: int
    lr: float | None


@dataclass(frozen=True)
class Chunk:
    kind: str  # "train" or an evaluation split
    row: int
    number: int
    tasks: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}-r{self.row:04d}-c{self.number:05d}"


def plan_chunks(tasks: dict[str, list[Task]], rows: int, chunk_tasks: int) -> list[Chunk]:
    """Every chunk of the dataset: evaluation fine-tunes first (the metrics), then the training rows. A chunk holds
    tasks of similar size (sorted by example count), so padding to the largest task of a chunk wastes little: tasks
    range from 21 to 1,776 examples, and a random chunk would pad most of them many times over."""
    out = []
    for kind, n_rows in [*((split, 1) for split in META_SPLITS), (TRAIN, rows)]:
        split_tasks = tasks["meta_train" if kind == TRAIN else kind]
        order = sorted(range(len(split_tasks)), key=lambda i: (len(split_tasks[i].train) + len(split_tasks[i].test), i))
        groups = [tuple(order[s : s + chunk_tasks]) for s in range(0, len(order), chunk_tasks)]
        out += [Chunk(kind, r, c, group) for r in range(n_rows) for c, group in enumerate(groups)]
    return out


class ChunkDataset(Dataset):
    """Item = (chunk name, the chunk's tasks as one padded TaskBatch)."""

    def __init__(self, chunks: list[Chunk], episodes: dict[str, TaskEpisodes]):
        self.chunks, self.episodes = chunks, episodes

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[str, TaskBatch]:
        chunk = self.chunks[k]
        episodes = self.episodes[chunk.kind]
        episodes.set_epoch(chunk.row)  # the random view of row r is the one of "epoch" r: reproducible per chunk
        return chunk.name, collate_tasks([episodes[i] for i in chunk.tasks])


class AdaptationChunkDataModule(MetaTaskDataModule):
    """Predict batches = chunks still missing from the module's work dir."""

    def __init__(
        self,
        source: TaskSource,
        *,
        train_support_view: str = "random",
        train_query_view: str = "test",
        upstream: dict[str, Artifact] | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            source,
            train_support_view=train_support_view,
            train_query_view=train_query_view,
            upstream=upstream,
            **kwargs,
        )

    def predict_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(module, AdaptationModule):
            raise ConfigError(
                f"data._target_ {type(self).__qualname__} feeds the adaptation stage, not {type(module).__qualname__}"
            )
        episodes = {TRAIN: self.episodes("meta_train", *self.train_views, support_shots=self.support_shots)}
        episodes |= {split: self.episodes(split) for split in META_SPLITS}
        dataset = ChunkDataset(module.pending_chunks(), episodes)
        return DataLoader(dataset, batch_size=None, shuffle=False, **self.loader_options())


class AdaptationModule(Stage, name="adaptation"):
    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """Its HNET decodes the latents it fine-tunes."""
        return ("hnet",)

    def __init__(
        self,
        rows: int,
        inner: AdaptationInnerSpec,
        chunk_tasks: int,
        work_dir: str,
        std_min: float = 1e-3,
        seed: int = 0,
        upstream: dict[str, Artifact] | None = None,
    ):
        super().__init__()
        self.inner = as_spec(AdaptationInnerSpec, inner, "model.inner")
        hnet = self.upstream_artifact(upstream, "hnet")
        upstream = dict(upstream or {})
        self.base: LatentLearner = self._latent_base(hnet, upstream.get("vae"))
        lr = self.inner.lr
        if lr is None:  # the rate the HNET was meta-trained and evaluated with
            lr = float(OmegaConf.load(hnet.file("config.yaml")).model.inner.lr)
        self.inner_loop = InnerLoop(steps=int(self.inner.steps), lr=float(lr), second_order=False)
        self.rows, self.chunk_tasks, self.std_min, self.seed = rows, chunk_tasks, std_min, seed
        self.description = {
            "upstream": {k: a.fingerprint for k, a in upstream.items()},
            "rows": rows,
            "inner": {"steps": self.inner_loop.steps, "lr": self.inner_loop.lr},
            "chunk_tasks": chunk_tasks,
            "chunking": "size-sorted",
            "seed": seed,
        }
        self.work_dir = Path(work_dir.format(fingerprint=fingerprint(self.description)[:12]))
        self.artifact_ready = False  # until on_predict_end has assembled the dataset
        self.result: AdaptationData | None = None

    @staticmethod
    def _latent_base(hnet: Artifact, vae: Artifact | None) -> LatentLearner:
        if vae is not None:  # the VAE MetaModel (spec §3.5): latents live in the VAE's latent space
            from metadiff.stages.vae import load_vae_latent_learner

            return load_vae_latent_learner(vae, load_hnet_latent_learner(hnet))
        return load_hnet_latent_learner(hnet)

    # -- work plan ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        data = self.datamodule_view(MetaTaskData)
        self.tasks = {split: data.tasks[split] for split in META_SPLITS}
        self.chunks = plan_chunks(self.tasks, self.rows, self.chunk_tasks)
        if self.trainer.is_global_zero:
            self._open_work_dir()
        self.trainer.strategy.barrier()
        if not self.pending_chunks():
            # every chunk is on disk already (a run killed after its last chunk, or the same dataset built as another
            # run's upstream): Lightning skips a predict loop without batches and its end hook with it
            self._assemble_once_complete()

    def _open_work_dir(self) -> None:
        marker = self.work_dir / "partial.json"
        if marker.is_file() and read_json(marker, what="adaptation work marker") != self.description:
            log.warning("%s holds chunks of another configuration: starting over", self.work_dir)
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_json(marker, self.description)
        done = sum((self.work_dir / f"{c.name}.pt").is_file() for c in self.chunks)
        if done:
            log.info("resuming adaptation in %s: %d of %d chunks already done", self.work_dir, done, len(self.chunks))

    def pending_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks if not (self.work_dir / f"{c.name}.pt").is_file()]

    # -- one chunk ------------------------------------------------------------------------------------------------
    def predict_step(self, item: tuple[str, TaskBatch], batch_idx: int) -> None:
        name, batch = item
        initial = self.base.initial_inner(batch.question)
        adapted = self.inner_loop.adapt(self.base, batch, inner=initial)
        with torch.no_grad():
            start = self.base.logits(initial, batch.question, batch.query_x, batch.answers, batch.answer_mask)
            end = self.base.logits(adapted, batch.question, batch.query_x, batch.answers, batch.answer_mask)
        record = {
            "z": adapted["z"].float().cpu(),
            "task_index": batch.task_index.cpu(),
            "start_acc": masked_task_accuracy(start, batch.query_y, batch.query_mask).cpu(),
            "end_acc": masked_task_accuracy(end, batch.query_y, batch.query_mask).cpu(),
        }
        with atomic_path(self.work_dir / f"{name}.pt") as tmp:
            save_tensors(record, tmp)

    # -- assembly -------------------------------------------------------------------------------------------------
    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier()
        self._assemble_once_complete()

    def _assemble_once_complete(self) -> None:
        """Rank 0 assembles the dataset from the finished chunks and marks the artifact ready (once)."""
        if self.artifact_ready:
            return
        if self.fast_dev_run:
            log.warning("fast_dev_run: adaptation dataset not assembled (only one chunk was computed)")
            return
        if not self.trainer.is_global_zero:
            return
        missing = self.pending_chunks()
        if missing:
            raise RuntimeError(
                f"adaptation: {len(missing)} chunks missing in {self.work_dir} (first: {missing[0].name})"
            )
        self.result, metrics = self._assemble()
        self.summary_metrics.update(metrics)
        self.set_results_text(self._table(metrics))
        self.artifact_ready = True

    def _table(self, metrics: dict[str, float]) -> str:
        steps = self.inner_loop.steps
        rows = [
            row
            for split in META_SPLITS
            for row in (
                (f"{split}: the init latent", f"adaptation/{split}_init_acc"),
                (f"{split}: after {steps} SGD steps on its train split", f"adaptation/{split}_finetuned_acc"),
            )
        ]
        rows.append(("mean per-dimension std of the latents", "adaptation/latent_std_mean"))
        title = (
            f"adaptation: {self.rows} fine-tuned latents per meta-train task; query accuracy of each task's "
            "evaluation fine-tune (mean +- 95% CI):"
        )
        return results_table(title, metrics, rows)

    def _assemble(self) -> tuple[AdaptationData, dict[str, float]]:
        n = {s: len(t) for s, t in self.tasks.items()}
        d = self.base.latent_dim
        train = torch.zeros(self.rows, n["meta_train"], d)
        evals = {s: torch.zeros(n[s], d) for s in META_SPLITS}
        accs: dict[str, dict[str, list[torch.Tensor]]] = {s: {"start": [], "end": []} for s in META_SPLITS}
        for chunk in self.chunks:
            rec = load_tensors(self.work_dir / f"{chunk.name}.pt")
            if chunk.kind == TRAIN:
                train[chunk.row, rec["task_index"]] = rec["z"]
            else:
                evals[chunk.kind][rec["task_index"]] = rec["z"]
                accs[chunk.kind]["start"].append(rec["start_acc"])
                accs[chunk.kind]["end"].append(rec["end_acc"])
        questions = torch.stack([self._question(t.question) for t in self.tasks["meta_train"]])
        flat = train.reshape(-1, d)
        data = AdaptationData(
            train_latents=train,
            eval_latents=evals,
            train_questions=questions,
            tasks={s: [t.question for t in ts] for s, ts in self.tasks.items()},
            init_latent=self.base.init_latent.cpu(),
            latent_mean=flat.mean(0),
            latent_std=flat.std(0).clamp_min(self.std_min),
        )
        metrics = {}
        for split in META_SPLITS:
            for kind, label in (("start", "init"), ("end", "finetuned")):
                mean, ci = mean_ci95(torch.cat(accs[split][kind]))
                metrics[f"adaptation/{split}_{label}_acc"], metrics[f"adaptation/{split}_{label}_acc_ci95"] = mean, ci
        metrics["adaptation/latent_std_mean"] = float(data.latent_std.mean())
        metrics["adaptation/rows"] = float(self.rows)
        return data, metrics

    def _question(self, question: str) -> torch.Tensor:
        store = self.datamodule_view(MetaTaskData).store
        return torch.from_numpy(np.asarray(store.question(question), dtype=np.float32)).reshape(-1)

    def write_artifact(self, directory: Path) -> None:
        assert self.result is not None
        self.result.save(directory / ADAPTATION_FILE)
        (directory / "adaptation.json").write_text(
            json.dumps(
                {
                    **self.description,
                    "latent_dim": self.result.latent_dim,
                    "tasks": {s: {"n": len(q), "hash": task_list_hash(q)} for s, q in self.result.tasks.items()},
                },
                indent=2,
            )
        )
