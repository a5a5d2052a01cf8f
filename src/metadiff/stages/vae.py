"""Stage `vae`: a VAE over fine-tuned task latents or the adapter weights the HNET makes of them (spec §3.5, §4.5).

Training data: one row of the adaptation dataset per epoch. `input: weights` (the spec) decodes each latent with the
frozen HNET into flat adapter weights w [P] and encodes those; `input: latent` encodes the latent [d] itself and
decodes through the HNET afterwards (P = 65,920 inputs make Adam unstable at the spec's lr on the embedded data:
measured, the loss diverged at lr 1e-4 and stalled at 1e-5). Loss: reconstruction + `kld_weight` * KL, both
/ sqrt(input size) as in the original.

Evaluation does not stop at MSE: each task's fine-tuned weights w ("encoded") and their reconstruction G(mu(E(w)))
("decoded") are scored on the task's query split, and the paired per-task difference is reported with a 95% CI, so
"the VAE keeps what makes the weights good for their task" is measured directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.meta_vqa.batches import TaskBatch
from metadiff.data.meta_vqa.datamodule import EVAL_SPLITS
from metadiff.eval.per_task import PerTaskValues, ci_report
from metadiff.eval.tables import results_table
from metadiff.meta.latent import LatentLearner
from metadiff.nets.adapter import adapter_logits, masked_task_accuracy
from metadiff.nets.vae import WeightVAE
from metadiff.stages.base import LatentData, Stage
from metadiff.stages.fewshot import load_hnet_latent_learner
from metadiff.store import Artifact, load_artifact

VAE_WEIGHTS, VAE_SPEC = "vae.pt", "vae.json"
EVAL_VALUES = ("encoded_acc", "decoded_acc", "decoded_minus_encoded", "relative_mse")
INPUTS = ("weights", "latent")


@dataclass(frozen=True)
class VAESpec:
    """`model.vae`: the VAE's size (`metadiff.nets.vae.WeightVAE`'s arguments except `in_dim`, the input's)."""

    latent_dim: int
    hidden: list[int]  # encoder hidden sizes; the decoder uses them reversed
    logvar_shift: float


def load_vae(artifact: Artifact) -> WeightVAE:
    spec = json.loads(Path(artifact.file(VAE_SPEC)).read_text())
    vae = WeightVAE(spec["in_dim"], spec["latent_dim"], spec["hidden"], spec["logvar_shift"])
    vae.load_state_dict(torch.load(artifact.file(VAE_WEIGHTS), map_location="cpu", weights_only=True))
    vae.input = spec["input"]
    return vae.eval()


def load_vae_latent_learner(artifact: Artifact, hnet: LatentLearner) -> LatentLearner:
    """The "VAE MetaModel" (spec §3.5): the VAE decoder generates the weights; every task starts from the posterior
    mean of the HNET's initial weights (deterministic; the original drew one random sample, §8 B33)."""
    if hnet.question_init:  # each task would start from its question, an HNET latent with no place in the VAE's space
        raise ConfigError(
            f"VAE {artifact.path}: the VAE MetaModel starts every task from the VAE's code of the HNET's one init; "
            "this HNET starts each task from its question (model.learner.question_init: true), which it cannot encode "
            "as a start: use an HNET with question_init false"
        )
    vae = load_vae(artifact)
    size = hnet.shape.n_params if vae.input == "weights" else hnet.latent_dim
    if vae.in_dim != size:
        raise ConfigError(f"VAE {artifact.path} encodes {vae.in_dim}-d {vae.input}, this HNET's are {size}-d")
    with torch.no_grad():
        start = hnet.init_latent[None]
        init = vae.encode(hnet.decode(start) if vae.input == "weights" else start)[0][0]
    generator = vae.decoder if vae.input == "weights" else torch.nn.Sequential(vae.decoder, hnet.generator)
    return LatentLearner(generator, init, hnet.shape, hnet.logit_scale, hnet.alpha)


def load_adaptation_base(hnet: Artifact, adaptation: Artifact | None) -> LatentLearner:
    """The generator the latents of an `adaptation` artifact live in: the HNET's hypernetwork (of artifact `hnet`),
    or the VAE decoder when the adaptation dataset was built from a VAE (the spec's B' route)."""
    learner = load_hnet_latent_learner(hnet)
    built_from = adaptation.manifest.get("upstream", {}) if adaptation is not None else {}
    if adaptation is not None and "vae" in built_from:
        return load_vae_latent_learner(load_artifact(adaptation.upstream_path("vae")), learner)
    return learner


class VAEModule(Stage, name="vae"):
    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """It decodes the adaptation latents into weights with the HNET."""
        return ("hnet", "adaptation")

    def __init__(
        self,
        input: str,
        vae: VAESpec,
        kld_weight: float,
        normalize: bool,
        optimizer: Callable[..., torch.optim.Optimizer],
        upstream: dict[str, Artifact] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "upstream"])
        self.vae_spec = as_spec(VAESpec, vae, "model.vae")
        if input not in INPUTS:
            raise ConfigError(f"model.input = '{input}' is not one of {INPUTS}")
        hnet, adaptation = self.upstream_artifact(upstream, "hnet"), self.upstream_artifact(upstream, "adaptation")
        self.base, self.input = load_adaptation_base(hnet, adaptation), input
        self.vae = WeightVAE(
            self.base.shape.n_params if input == "weights" else self.base.latent_dim,
            latent_dim=self.vae_spec.latent_dim,
            hidden=self.vae_spec.hidden,
            logvar_shift=self.vae_spec.logvar_shift,
        )
        self.kld_weight, self.normalize, self.optimizer_factory = kld_weight, normalize, optimizer
        # every rank evaluates all tasks (EveryRankSampler): nothing to gather
        self.values = PerTaskValues([f"{s}/{v}" for s in (*EVAL_SPLITS, "meta_test") for v in EVAL_VALUES], sync=False)

    def frozen_upstream_nets(self) -> tuple[str, ...]:
        """The HNET (or the VAE the adaptation was built from) that decodes latents: read from its artifact."""
        return ("base",)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.vae.parameters())

    def on_fit_start(self) -> None:
        """Standardisation from the weights of the first adaptation row (spec §4.5); a resumed run keeps the
        statistics it saved (they are buffers of the checkpoint)."""
        if not self.normalize or self.trainer.ckpt_path:
            return
        data = self.datamodule_view(LatentData).adaptation
        with torch.no_grad():
            x = self.vae_input(data.train_latents[0].to(self.device))
        # the per-dimension std replaced by its mean: one scalar, as the original (§8 B18)
        self.vae.set_normalization(x.mean(0), x.std(0).mean())

    def vae_input(self, z: torch.Tensor) -> torch.Tensor:
        return self.base.decode(z) if self.input == "weights" else z

    def weights_of(self, x: torch.Tensor) -> torch.Tensor:
        """Adapter weights of a VAE-space vector (the identity for `input: weights`)."""
        return x if self.input == "weights" else self.base.decode(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z, _, _ = batch
        with torch.no_grad():
            x = self.vae_input(z)
        terms = self.vae.losses(x)
        loss = terms["rec"] + self.kld_weight * terms["kl"]
        self.log_dict(
            {
                "train/loss": loss,
                "train/rec_loss": terms["rec"],
                "train/kl_loss": terms["kl"],
                "train/mu_norm": terms["mu_norm"],
            },
            prog_bar=True,
            batch_size=z.shape[0],
        )
        return loss

    # -- evaluation: task accuracy of encoded vs decoded weights --------------------------------------------------
    def _evaluate(self, batch: TaskBatch, split: str) -> None:
        z = self.datamodule_view(LatentData).adaptation.eval_latents[split][batch.task_index.cpu()].to(self.device)
        w = self.base.decode(z)
        w_hat = self.weights_of(self.vae.reconstruct(w if self.input == "weights" else z))  # w: decoded once
        acc = {
            name: masked_task_accuracy(self._weight_logits(weights, batch), batch.query_y, batch.query_mask)
            for name, weights in (("encoded_acc", w), ("decoded_acc", w_hat))
        }
        self.values.update(f"{split}/encoded_acc", acc["encoded_acc"])
        self.values.update(f"{split}/decoded_acc", acc["decoded_acc"])
        self.values.update(f"{split}/decoded_minus_encoded", acc["decoded_acc"] - acc["encoded_acc"])
        spread = (w - w.mean(0, keepdim=True)).pow(2).sum(-1).mean().clamp_min(1e-12)
        self.values.update(f"{split}/relative_mse", (w_hat - w).pow(2).sum(-1) / spread)

    def _weight_logits(self, flat: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        return adapter_logits(
            self.base.shape.unflatten(flat),
            batch.query_x.float(),
            batch.answers,
            batch.answer_mask,
            scale=self.base.logit_scale,
        )

    def validation_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, EVAL_SPLITS[dataloader_idx])

    def on_validation_epoch_end(self) -> None:
        for split in EVAL_SPLITS:
            values = self.values.compute([f"{split}/{v}" for v in EVAL_VALUES])
            self.log_dict(ci_report(f"val/{split}", {k.split("/", 1)[1]: v for k, v in values.items()}))

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "meta_test")

    def on_test_epoch_end(self) -> None:
        values = self.values.compute([f"meta_test/{v}" for v in EVAL_VALUES])
        report = ci_report("test", {k.split("/", 1)[1]: v for k, v in values.items()})
        self.log_dict(report)
        self.summary_metrics.update(report)
        rows = [
            ("fine-tuned weights w (encoded)", "test/encoded_acc"),
            ("their reconstruction G(mu(E(w))) (decoded)", "test/decoded_acc"),
            ("decoded minus encoded (paired per task)", "test/decoded_minus_encoded"),
            ("reconstruction MSE / spread of the weights", "test/relative_mse"),
        ]
        title = f"vae ({self.input}): task accuracy of the weights on meta-test tasks (mean +- 95% CI):"
        self.set_results_text(results_table(title, report, rows))

    def write_artifact(self, directory: Path) -> None:
        torch.save(self.vae.state_dict(), directory / VAE_WEIGHTS)
        (directory / VAE_SPEC).write_text(
            json.dumps(
                {
                    "input": self.input,
                    "in_dim": self.vae.in_dim,
                    "latent_dim": self.vae.latent_dim,
                    "hidden": list(self.vae_spec.hidden),
                    "logvar_shift": self.vae.logvar_shift,
                    "normalize": self.normalize,
                }
            )
        )
