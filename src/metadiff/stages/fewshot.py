"""Stages `multitask`, `maml` and `hnet`: few-shot pretraining of the HyperCLIP family (spec §3-§5).

One LightningModule; the method is data in conf/ (learner mode + inner steps, spec §4.3):
multitask = `mnet` with 0 training inner steps, MAML = `mnet` with K steps, HNET = `enet`. Each meta-step adapts a
whole batch of tasks at once (`metadiff.meta.inner_loop`) and backpropagates the query loss to the meta-parameters;
Lightning owns the optimiser step, gradient clipping (clipped before the step, fixing the original's B4), precision
and DDP (each rank's mean query loss over its tasks; DDP averages the meta-gradients across ranks).

Evaluation (support = `train` split, query = `test` split): zero-shot accuracy (the meta-learned init, no
adaptation), few-shot accuracy after `eval_steps` inner steps, the CLIP zero-shot baseline (identity adapter) on the
same tasks, and n-shot trials n = 1..N over reruns with their own n-shot seeds, each as mean +- 95% CI over tasks.
Validation logs `val/meta_train_*` (fit) and `val/meta_val_*` (what selection reads); only the test reads meta-test.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from omegaconf import DictConfig
from torchmetrics import CatMetric

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.meta_vqa.batches import TaskBatch
from metadiff.data.meta_vqa.datamodule import EVAL_SPLITS, upstream_store_dir
from metadiff.eval.plots import log_image, save_shots_plot
from metadiff.eval.stats import mean_ci95
from metadiff.eval.tables import results_table
from metadiff.features.store import FeatureStore
from metadiff.meta.inner_loop import InnerLoop
from metadiff.meta.latent import LatentLearner
from metadiff.meta.learner import FewShotLearner
from metadiff.nets.adapter import masked_task_accuracy, masked_task_losses
from metadiff.stages.base import MetaTaskData, Stage
from metadiff.store import Artifact
from metadiff.utils.dtypes import full_precision
from metadiff.utils.io import write_json

log = logging.getLogger(__name__)
LEARNER_WEIGHTS = "learner.pt"  # the artifact files of a few-shot stage: state dict + constructor arguments
LEARNER_SPEC = "learner.json"
STAGES = ("multitask", "maml", "hnet")  # the `stage:` values this module runs (`FewShotModule.stage_name`)


@dataclass(frozen=True)
class LearnerSpec:
    """`model.learner`: the few-shot model: the arguments of `metadiff.meta.learner.FewShotLearner` except
    `embed_dim` (the feature store's)."""

    mode: str  # mnet (MAML / multitask) | enet (HNET) | hnet (question -> weights)
    adapter_hidden: int
    hnet_hidden: list[int]
    embedding_dim: int
    question_init: bool
    logit_scale: float
    adapter_init_std: float
    zero_init_output: bool
    alpha: float


@dataclass(frozen=True)
class InnerLoopSpec:
    """`model.inner`: the training inner loop (`metadiff.meta.inner_loop.InnerLoop`)."""

    steps: int
    lr: float
    second_order: bool


def store_embed_dim(features: Artifact) -> int:
    """Embedding size of the feature store of a `features` artifact (what the adapter must take)."""
    return FeatureStore(Path(upstream_store_dir({"features": features}))).dim


def clip_zero_shot_accuracy(batch: TaskBatch) -> torch.Tensor:
    """Per-task accuracy of raw CLIP: image vs answer-prompt cosine (the identity adapter, spec §3.1)."""
    x = torch.nn.functional.normalize(full_precision(batch.query_x), dim=-1)
    t = torch.nn.functional.normalize(full_precision(batch.answers), dim=-1)
    logits = (x @ t.transpose(1, 2)).masked_fill(~batch.answer_mask.unsqueeze(1), float("-inf"))
    return masked_task_accuracy(logits, batch.query_y, batch.query_mask)


class FewShotModule(Stage, name="fewshot"):
    """Stages `multitask`, `maml` and `hnet` (`stage_names`; `name` is the family's); which one an instance runs
    follows from its learner mode and inner steps (`stage_name`)."""

    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """Without `model.embed_dim`, the feature store's embedding size (upstream `features`)."""
        return ("features",) if model.get("embed_dim") is None else ()

    def __init__(
        self,
        method: str,
        learner: LearnerSpec,
        inner: InnerLoopSpec,
        eval_steps: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        n_shot_max: int = 5,
        n_shot_reruns: int = 2,
        plot: bool = True,
        embed_dim: int | None = None,
        upstream: dict[str, Artifact] | None = None,
    ):
        super().__init__()
        # Hydra partials do not load weights-only; the upstream artifacts are paths, not hyperparameters
        self.save_hyperparameters(logger=False, ignore=["optimizer", "upstream"])
        self.optimizer_factory = optimizer
        self.method = method
        self.learner_spec = as_spec(LearnerSpec, learner, "model.learner")
        self.inner = as_spec(InnerLoopSpec, inner, "model.inner")
        self.inner_loop = InnerLoop(steps=self.inner.steps, lr=self.inner.lr, second_order=self.inner.second_order)
        self.eval_steps, self.n_shot_max, self.n_shot_reruns, self.plot = eval_steps, n_shot_max, n_shot_reruns, plot
        if not embed_dim:  # the store's (required_upstreams)
            embed_dim = store_embed_dim(self.upstream_artifact(upstream, "features"))
        self.learner = FewShotLearner(embed_dim=embed_dim, **dataclasses.asdict(self.learner_spec))
        # every rank evaluates all tasks (EveryRankSampler): nothing to gather
        self.eval_acc = torch.nn.ModuleDict(
            {
                f"{split}_{kind}": CatMetric(sync_on_compute=False)
                for split in (*EVAL_SPLITS, "meta_test")
                for kind in ("zeroshot", "fewshot", "clip")
            }
        )

    @classmethod
    def stage_names(cls) -> tuple[str, ...]:
        return STAGES

    @property
    def stage_name(self) -> str:
        """The method the configuration makes (spec §4.3): `multitask` = the adapter (`mnet`) with 0 training inner
        steps, `maml` = `mnet` with K > 0 steps, `hnet` = a hypernetwork learner (`enet`, or `hnet` mode)."""
        if self.learner_spec.mode == "mnet":
            return "maml" if self.inner.steps > 0 else "multitask"
        return "hnet"

    # -- model ----------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dim = self.datamodule_view(MetaTaskData).embed_dim
        if dim != self.learner.shape.embed_dim:
            raise ConfigError(
                f"model.embed_dim = {self.learner.shape.embed_dim} but the feature store holds {dim}-d "
                "embeddings (leave model.embed_dim null to take it from the upstream store)"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.learner.parameters())

    # -- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: TaskBatch, batch_idx: int) -> torch.Tensor:
        initial = self.learner.initial_inner(batch.question)
        adapted = self.inner_loop.adapt(self.learner, batch, inner=initial)
        logits = self.learner.query_logits(
            adapted, initial, batch.question, batch.query_x, batch.answers, batch.answer_mask
        )
        loss = masked_task_losses(logits, batch.query_y, batch.query_mask).mean()  # = query_loss, logits reused
        acc = masked_task_accuracy(logits.detach(), batch.query_y, batch.query_mask).mean()
        # the global batch's means: the ranks hold equal shares of it (metadiff.data.global_batch), so the mean over
        # ranks is the one-process value; unsynced, a rank would report its own share (tests/test_parity.py)
        self.log_dict(
            {"train/query_loss": loss, "train/query_acc": acc}, prog_bar=True, batch_size=batch.n_tasks, sync_dist=True
        )
        return loss

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _accuracies(self, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            initial = self.learner.initial_inner(batch.question)
            zero = self.learner.logits(initial, batch.question, batch.query_x, batch.answers, batch.answer_mask)
        adapted = self.inner_loop.adapt(self.learner, batch, inner=initial, steps=steps)
        with torch.no_grad():
            few = self.learner.query_logits(
                adapted, initial, batch.question, batch.query_x, batch.answers, batch.answer_mask
            )
        return {
            "zeroshot": masked_task_accuracy(zero, batch.query_y, batch.query_mask),
            "fewshot": masked_task_accuracy(few, batch.query_y, batch.query_mask),
            "clip": clip_zero_shot_accuracy(batch),
        }

    def _per_task(self, split: str, kind: str) -> CatMetric:
        """The per-task values of one accuracy on one split (`eval_acc` is a ModuleDict of CatMetrics)."""
        return cast(CatMetric, self.eval_acc[f"{split}_{kind}"])

    def validation_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        split = EVAL_SPLITS[dataloader_idx]
        for kind, acc in self._accuracies(batch, self.eval_steps).items():
            self._per_task(split, kind).update(acc)

    def _log_eval(self, prefix: str, splits: tuple[str, ...]) -> dict[str, float]:
        """Mean +- 95% CI over tasks of each accuracy, and of the paired per-task gains of few-shot adaptation over
        the zero-shot init and over CLIP (same tasks, so the paired CI is the one that decides "better")."""
        out = {}
        for split in splits:
            values = {}
            for kind in ("zeroshot", "fewshot", "clip"):
                metric = self._per_task(split, kind)
                values[kind] = metric.compute().cpu()
                metric.reset()
            head = f"{prefix}/{split}_" if prefix == "val" else f"{prefix}/"
            for name, per_task in (
                *((f"{k}_acc", v) for k, v in values.items()),
                ("fewshot_minus_zeroshot", values["fewshot"] - values["zeroshot"]),
                ("fewshot_minus_clip", values["fewshot"] - values["clip"]),
            ):
                mean, ci = mean_ci95(per_task)
                out[head + name], out[head + name + "_ci95"] = mean, ci
        self.log_dict(out, sync_dist=False)
        return out

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", EVAL_SPLITS)

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        for kind, acc in self._accuracies(batch, self.eval_steps).items():
            self._per_task("meta_test", kind).update(acc)

    def on_test_epoch_end(self) -> None:
        self.summary_metrics.update(self._log_eval("test", ("meta_test",)))
        if self.n_shot_max > 0:
            self.summary_metrics.update(self._n_shot_trials())
        self.set_results_text(self._table(self.summary_metrics))

    def _table(self, report: dict[str, float]) -> str:
        rows = [
            (f"few-shot: {self.eval_steps} inner steps on the support set", "test/fewshot_acc"),
            ("zero-shot: the meta-learned init, no adaptation", "test/zeroshot_acc"),
            ("CLIP zero-shot (identity adapter)", "test/clip_acc"),
            ("few-shot minus zero-shot (paired per task)", "test/fewshot_minus_zeroshot"),
            ("few-shot minus CLIP (paired per task)", "test/fewshot_minus_clip"),
        ]
        rows += [
            (f"few-shot from {n} example(s) per answer", f"test/{n}shot_acc") for n in range(1, self.n_shot_max + 1)
        ]
        table = results_table(f"{self.stage_name}: accuracy on meta-test tasks (mean +- 95% CI):", report, rows)
        plot = getattr(self, "plot_path", None)
        return table + (f"\nplot: {plot}" if plot is not None else "")

    def _n_shot_trials(self) -> dict[str, float]:
        """Accuracy with n support examples per answer, n = 1..N, `n_shot_reruns` n-shot seeds (spec §5.3)."""
        data = self.datamodule_view(MetaTaskData)
        # each trial covers as many task batches as the test loop did: all of them, unless the run limits them
        # (`trainer.limit_test_batches`, `fast_dev_run`), so a smoke run stays a smoke run
        n_batches = int(sum(self.trainer.num_test_batches))
        out: dict[str, float] = {}
        curve: dict[str, list[tuple[int, float, float]]] = {self.method: [], "CLIP zero-shot": []}
        for n in range(1, self.n_shot_max + 1):
            per_task = []
            for rerun in range(self.n_shot_reruns):
                episodes = data.episodes("meta_test", support_shots=n, n_shot_seed=data.n_shot_seed + rerun)
                loader = data.task_loader(episodes, data.eval_tasks_per_batch, shuffle=False)
                for batch in itertools.islice(loader, n_batches):
                    batch = self.transfer_batch_to_device(batch, self.device, 0)
                    per_task.append(self._accuracies(batch, self.eval_steps)["fewshot"])
            mean, ci = mean_ci95(torch.cat(per_task).cpu())
            out[f"test/{n}shot_acc"], out[f"test/{n}shot_acc_ci95"] = mean, ci
            curve[self.method].append((n, mean, ci))
        clip = (self.summary_metrics["test/clip_acc"], self.summary_metrics["test/clip_acc_ci95"])
        curve["CLIP zero-shot"] = [(n, *clip) for n in range(1, self.n_shot_max + 1)]
        self.log_dict(out)
        if self.plot and self.trainer.is_global_zero:
            self._save_plot(curve)
        return out

    def _save_plot(self, curve: dict[str, list[tuple[int, float, float]]]) -> None:
        out_dir = Path(self.trainer.default_root_dir)
        path = save_shots_plot(curve, out_dir / "accuracy_vs_shots.png", title=f"{self.method}: meta-test tasks")
        write_json(out_dir / "accuracy_vs_shots.json", curve)
        log_image(self.loggers, "test/accuracy_vs_shots", path)
        log.info("accuracy-vs-shots plot: %s", path)
        self.plot_path = path

    # -- artifact -------------------------------------------------------------------------------------------------
    def write_artifact(self, directory: Path) -> None:
        torch.save(self.learner.state_dict(), directory / LEARNER_WEIGHTS)
        (directory / LEARNER_SPEC).write_text(
            json.dumps(
                {
                    "method": self.method,
                    "embed_dim": self.learner.shape.embed_dim,
                    **dataclasses.asdict(self.learner_spec),
                },
                default=list,
            )
        )


def load_fewshot_learner(artifact: Artifact) -> tuple[FewShotLearner, dict]:
    """The trained few-shot model of an `hnet`/`maml`/`multitask` artifact and its description."""
    spec = json.loads(Path(artifact.file(LEARNER_SPEC)).read_text())
    keys = ["embed_dim", *(f.name for f in dataclasses.fields(LearnerSpec))]  # what write_artifact stored
    kwargs = {k: spec[k] for k in keys if k in spec}  # `if`: artifacts written before a key existed
    learner = FewShotLearner(**kwargs)
    learner.load_state_dict(torch.load(artifact.file(LEARNER_WEIGHTS), map_location="cpu", weights_only=True))
    return learner.eval(), spec


def load_hnet_latent_learner(artifact: Artifact) -> LatentLearner:
    """The HNET of a few-shot artifact as a latent learner: its hypernetwork and its meta-learned task embedding."""
    learner, spec = load_fewshot_learner(artifact)
    if learner.mode != "enet":
        raise ConfigError(
            f"upstream artifact {artifact.path} is a '{spec.get('method')}' model in '{learner.mode}' mode; the latent "
            "stages need an HNET (learner.mode=enet), e.g. experiment=hnet_synthvqa"
        )
    init = learner.enet.embedding if not learner.question_init else torch.zeros(learner.shape.embed_dim)
    return LatentLearner(learner.hnet, init, learner.shape, learner.logit_scale, learner.alpha, learner.question_init)
