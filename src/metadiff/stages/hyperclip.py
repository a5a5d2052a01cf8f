"""Stage `hyperclip`: a contrastive encoder of network weights aligned with the task's question embedding (spec §3.6,
§4.6), and HyperCLIP guidance (§4.9).

Training pairs come from the adaptation dataset: one row per epoch, each task latent turned into the encoder's input
(`input`): the flat adapter weights the HNET decodes (`weights`, the spec's choice), the latent itself (`latent`,
the cheaper encoding §8 B16 suggests), or the VAE reconstruction of the weights (`vae`, the spec's `train_on_vae`).

Evaluation on held-out tasks (meta-val at validation, meta-test at test): each task's fine-tuned weights must
retrieve its own question among all the split's questions (top-1 / top-5, chance 1/N) and in the original's 1-of-10
test (chance 0.1), plus the contrastive loss.
At test time, HyperCLIP guidance optimises each meta-test task's latent from the HNET init towards its question
(Adam on -cos, no labels: zero-shot) and reports the accuracy of the guided weights next to the init's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.meta_vqa.batches import TaskBatch
from metadiff.data.meta_vqa.datamodule import EVAL_SPLITS
from metadiff.eval.per_task import PerTaskValues, ci_report
from metadiff.eval.tables import results_table
from metadiff.nets.adapter import masked_task_accuracy
from metadiff.nets.hyperclip import (
    GuidanceObjective,
    HyperCLIPEncoder,
    contrastive_loss,
    n_way_accuracy,
    question_log_prob,
    retrieval_accuracy,
)
from metadiff.stages.base import LatentData, Stage
from metadiff.stages.vae import load_adaptation_base, load_vae
from metadiff.store import Artifact

INPUTS = ("weights", "latent", "vae")
HYPERCLIP_WEIGHTS, HYPERCLIP_SPEC = "hyperclip.pt", "hyperclip.json"


@dataclass(frozen=True)
class EncoderSpec:
    """`model.encoder`: the weight encoder (`metadiff.nets.hyperclip.HyperCLIPEncoder`'s arguments except its
    input and output sizes)."""

    hidden: list[int]
    nonlinearity: str
    logit_scale: float
    learn_logit_scale: bool


@dataclass(frozen=True)
class RetrievalSpec:
    """`model.retrieval`: the original's task-identification test, the true task vs `n_way - 1` random others."""

    n_way: int
    seed: int


@dataclass(frozen=True)
class GuidanceSpec:
    """`model.guidance`: HyperCLIP guidance at test time, Adam on -`objective` from the HNET init (0 steps: off):
    `cosine` (the spec's), or `softmax`, the log-probability of the task's question among the meta-train questions
    (`metadiff.nets.hyperclip.question_log_prob`)."""

    steps: int
    lr: float
    l2: float
    objective: GuidanceObjective


class HyperCLIPModule(Stage, name="hyperclip"):
    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """The HNET decodes the adaptation latents; `input: vae` encodes them with the VAE."""
        return ("hnet", "adaptation", *(("vae",) if model.get("input") == "vae" else ()))

    def __init__(
        self,
        input: str,
        encoder: EncoderSpec,
        normalize: bool,
        loss_reduction: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        retrieval: RetrievalSpec,
        guidance: GuidanceSpec,
        embed_dim: int | None = None,
        upstream: dict[str, Artifact] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "upstream"])
        self.encoder_spec = as_spec(EncoderSpec, encoder, "model.encoder")
        self.retrieval = as_spec(RetrievalSpec, retrieval, "model.retrieval")
        self.guidance = as_spec(GuidanceSpec, guidance, "model.guidance")
        if input not in INPUTS:
            raise ConfigError(f"model.input = '{input}' is not one of {INPUTS}")
        hnet, adaptation = self.upstream_artifact(upstream, "hnet"), self.upstream_artifact(upstream, "adaptation")
        self.base = load_adaptation_base(hnet, adaptation)
        self.vae = load_vae(self.upstream_artifact(upstream, "vae")).requires_grad_(False) if input == "vae" else None
        in_dim = self.base.latent_dim if input == "latent" else self.base.shape.n_params
        self.encoder = HyperCLIPEncoder(
            in_dim, embed_dim or self.base.shape.embed_dim, **dataclasses.asdict(self.encoder_spec)
        )
        self.input, self.normalize, self.loss_reduction = input, normalize, loss_reduction
        self.optimizer_factory = optimizer
        # every rank evaluates all tasks (EveryRankSampler): nothing to gather
        self.values = PerTaskValues(
            [f"{s}/{v}" for s in (*EVAL_SPLITS, "meta_test") for v in ("emb", "question")]
            + ["guided_acc", "init_acc", "guided_minus_init"],
            sync=False,
        )

    def frozen_upstream_nets(self) -> tuple[str, ...]:
        """The HNET (or VAE decoder) and the VAE: read from their artifacts, never trained here."""
        return ("base", *(("vae",) if self.vae is not None else ()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.encoder.parameters())

    def encoder_input(self, z: torch.Tensor) -> torch.Tensor:
        if self.input == "latent":
            return z
        w = self.base.decode(z)
        if self.vae is None:
            return w
        if self.vae.input == "latent":  # G(E(.)) in the VAE's own input space, then the HNET's weights
            return self.base.decode(self.vae.reconstruct(z, stochastic=self.training))
        return self.vae.reconstruct(w, stochastic=self.training)

    def on_fit_start(self) -> None:
        """Per-dimension standardisation from the first adaptation row (spec §4.6; std clipped at 0.01)."""
        if not self.normalize or self.trainer.ckpt_path:
            return
        with torch.no_grad():
            x = self.encoder_input(self.datamodule_view(LatentData).adaptation.train_latents[0].to(self.device))
        self.encoder.set_normalization(x.mean(0), x.std(0))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z, question, _ = batch
        with torch.no_grad():
            x = self.encoder_input(z)
        logits = self.encoder.logits(x, question)
        loss = contrastive_loss(logits, self.loss_reduction)
        acc = retrieval_accuracy(logits.detach()).mean()
        self.log_dict(
            {"train/loss": loss, "train/batch_top1": acc, "train/logit_scale": self.encoder.logit_scale},
            prog_bar=True,
            batch_size=z.shape[0],
        )
        return loss

    # -- evaluation: retrieval of the task's question from its fine-tuned weights ---------------------------------
    def _collect(self, batch: TaskBatch, split: str) -> None:
        z = self.datamodule_view(LatentData).adaptation.eval_latents[split][batch.task_index.cpu()].to(self.device)
        self.values.update(f"{split}/emb", self.encoder(self.encoder_input(z)))
        self.values.update(f"{split}/question", batch.question.float())

    def _retrieval_report(self, prefix: str, split: str) -> dict[str, float]:
        got = self.values.compute([f"{split}/emb", f"{split}/question"])
        emb, question = got[f"{split}/emb"], got[f"{split}/question"]
        logits = self.encoder.logit_scale.detach().cpu() * emb @ F.normalize(question, dim=-1).T
        n, n_way = logits.shape[0], int(self.retrieval.n_way)
        hits = {"top1": retrieval_accuracy(logits, 1), "top5": retrieval_accuracy(logits, 5)}
        if n >= n_way:
            hits[f"{n_way}way"] = n_way_accuracy(logits, n_way, seed=int(self.retrieval.seed))
        out = ci_report(prefix, hits)
        out[f"{prefix}/loss"] = float(contrastive_loss(logits, self.loss_reduction))
        out[f"{prefix}/chance_top1"], out[f"{prefix}/chance_top5"] = 1 / n, min(5, n) / n
        out[f"{prefix}/n_tasks"] = float(n)
        return out

    def validation_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, EVAL_SPLITS[dataloader_idx])

    def on_validation_epoch_end(self) -> None:
        for split in EVAL_SPLITS:
            self.log_dict(self._retrieval_report(f"val/{split}", split))

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._collect(batch, "meta_test")
        if int(self.guidance.steps) > 0:
            self._guided_zero_shot(batch)

    def on_test_epoch_end(self) -> None:
        report = self._retrieval_report("test/retrieval", "meta_test")
        if int(self.guidance.steps) > 0:
            names = ["guided_acc", "init_acc", "guided_minus_init"]
            report |= ci_report("test/guidance", self.values.compute(names))
        self.log_dict(report)
        self.summary_metrics.update(report)
        self.set_results_text(self._table(report))

    def _table(self, report: dict[str, float]) -> str:
        n_way, n = int(self.retrieval.n_way), int(report["test/retrieval/n_tasks"])
        rows = [
            ("its own question is the top-1 of all", "test/retrieval/top1"),
            ("  chance (1 / tasks)", "test/retrieval/chance_top1"),
            ("its own question is in the top 5", "test/retrieval/top5"),
            ("  chance (5 / tasks)", "test/retrieval/chance_top5"),
            (f"its own question is the top-1 of {n_way} (original)", f"test/retrieval/{n_way}way"),
            ("contrastive loss", "test/retrieval/loss"),
        ]
        lines = results_table(
            f"hyperclip ({self.input}): retrieval of each of the {n} meta-test tasks' question from its fine-tuned "
            "weights (mean +- 95% CI):",
            report,
            rows,
        )
        if int(self.guidance.steps) > 0:
            guided = [
                (f"HyperCLIP-guided latent ({int(self.guidance.steps)} Adam steps)", "test/guidance/guided_acc"),
                ("HNET init latent", "test/guidance/init_acc"),
                ("guided minus init (paired per task)", "test/guidance/guided_minus_init"),
            ]
            lines += "\n" + results_table("zero-shot accuracy with HyperCLIP guidance:", report, guided).lstrip("\n")
        return lines

    # -- HyperCLIP guidance (spec §4.9): latent optimisation towards the question, zero-shot ----------------------
    def _guided_zero_shot(self, batch: TaskBatch) -> None:
        """Each task's latent starts at the HNET init and follows Adam on -objective(HyperCLIP(weights(z)),
        question) + l2/2 |z - z0|^2. Tasks are independent (the loss is a sum over tasks, Adam is element-wise), so
        the whole batch is guided at once."""
        initial = self.base.initial_inner(batch.question)["z"].detach()
        z = initial.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=float(self.guidance.lr))
        others = self.datamodule_view(LatentData).adaptation.train_questions.to(self.device)  # read by `softmax`
        with torch.enable_grad():
            for _ in range(int(self.guidance.steps)):
                score = question_log_prob(
                    self.encoder(self.encoder_input(z)),
                    batch.question,
                    self.guidance.objective,
                    self.encoder.logit_scale,
                    others,
                )
                loss = -score.sum() + 0.5 * float(self.guidance.l2) * (z - initial).pow(2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            acc = {
                name: masked_task_accuracy(
                    self.base.latent_logits(latent, batch.query_x, batch.answers, batch.answer_mask),
                    batch.query_y,
                    batch.query_mask,
                )
                for name, latent in (("guided_acc", z), ("init_acc", initial))
            }
        for name, value in acc.items():
            self.values.update(name, value)
        self.values.update("guided_minus_init", acc["guided_acc"] - acc["init_acc"])

    def write_artifact(self, directory: Path) -> None:
        torch.save(self.encoder.state_dict(), directory / HYPERCLIP_WEIGHTS)
        (directory / HYPERCLIP_SPEC).write_text(
            json.dumps(
                {
                    "input": self.input,
                    "in_dim": self.encoder.mlp.layers[0].in_features,
                    "embed_dim": self.encoder.mlp.layers[-1].out_features,
                    **dataclasses.asdict(self.encoder_spec),
                },
                default=list,
            )
        )


def load_hyperclip_encoder(artifact: Artifact) -> tuple[HyperCLIPEncoder, str]:
    """The trained HyperCLIP encoder of a `hyperclip` artifact and what it reads ('latent' or 'weights')."""
    spec = json.loads(artifact.file(HYPERCLIP_SPEC).read_text())
    if spec["input"] not in ("latent", "weights"):
        raise ConfigError(
            f"{artifact.path}: HyperCLIP guidance reads encoders of latents or weights, not input={spec['input']!r}"
        )
    encoder = HyperCLIPEncoder(
        spec["in_dim"],
        spec["embed_dim"],
        hidden=spec["hidden"],
        nonlinearity=spec["nonlinearity"],
        logit_scale=spec["logit_scale"],
        learn_logit_scale=spec["learn_logit_scale"],
    )
    encoder.load_state_dict(torch.load(artifact.file(HYPERCLIP_WEIGHTS), map_location="cpu", weights_only=True))
    return encoder.requires_grad_(False).eval(), spec["input"]
