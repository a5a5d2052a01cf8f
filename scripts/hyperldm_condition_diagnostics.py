"""Does the question carry the task? Zero-shot latent predictors on meta-val, next to the HNET init and the oracle.

A diagnostic for the HyperLDM claims on a built chain (`python train.py experiment=hyperldm_synthvqa seed=S` first):
if no simple map from the question embedding to a fine-tuned latent beats the HNET init on held-out tasks, a
conditional diffusion model over those latents has nothing to recover and classifier-free guidance cannot show.

    python scripts/hyperldm_condition_diagnostics.py seed=1 [more overrides of experiment=hyperldm_synthvqa]

Prints, on meta-val (selection data, never meta-test), the accuracy of:
- ridge maps question -> latent for several alphas, fitted on the meta-train evaluation fine-tunes;
- k-nearest meta-train questions (cosine) -> the mean of their fine-tuned latents;
- the latent R^2 of the ridge maps on meta-val (how much of the latents' between-task variance the question explains);
- a "same words" control: the mean latent of the meta-train tasks whose question has the same first word and the same
  shape word (a map that reads the question text, not its embedding).
"""

from __future__ import annotations

import re
import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from metadiff.config.paths import CONF_DIR
from metadiff.data.adaptation import AdaptationData
from metadiff.eval.ridge import RidgeMap
from metadiff.eval.stats import mean_ci95
from metadiff.nets.adapter import masked_task_accuracy
from metadiff.pipeline import instantiate_with_upstream, resolve_upstreams
from metadiff.stages.fewshot import load_hnet_latent_learner
from metadiff.store import find_artifact

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")


def question_key(question: str) -> tuple[str, str]:
    words = re.findall(r"[a-z]+", question.lower())
    shape = next((w.rstrip("s") for w in words if w.rstrip("s") in SHAPES), "-")
    return words[0] + " " + words[1], shape


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=hyperldm_synthvqa", "paths.output_dir=/tmp/diag-out", *overrides],
                      return_hydra_config=True)
        HydraConfig().set_config(cfg)
    for node in cfg.upstream.values():
        node.build_if_missing = False
    upstream = resolve_upstreams(cfg)
    data = instantiate_with_upstream(cfg.data, upstream)
    data.setup("validate")
    base = load_hnet_latent_learner(upstream["hnet"])
    adaptation: AdaptationData = data.adaptation
    loader = data.task_loader(data.episodes("meta_val"), 128, shuffle=False)
    batches = list(loader)

    def accuracy(predict) -> tuple[float, float]:
        return accuracy_on(batches, base, predict)

    q_train, z_train = adaptation.train_questions, adaptation.eval_latents["meta_train"]
    z_rows = adaptation.train_latents.mean(0)
    z_val = adaptation.eval_latents["meta_val"]
    rows = {
        "hnet_init": accuracy(lambda b: base.initial_inner(b.question)["z"]),
        "oracle": accuracy(lambda b: z_val[b.task_index]),
        "mean_latent": accuracy(lambda b: z_train.mean(0).expand(b.n_tasks, -1)),
    }
    q_val = torch.cat([b.question for b in batches])
    idx_val = torch.cat([b.task_index for b in batches])
    target = z_val[idx_val]
    total = ((target - target.mean(0)) ** 2).sum()
    r2 = {}
    for alpha in (1.0, 10.0, 100.0, 1000.0):
        for name, z in (("eval", z_train), ("rowmean", z_rows)):
            ridge = RidgeMap.fit(q_train, z, alpha)
            rows[f"ridge_{name}_a{alpha:g}"] = accuracy(lambda b, r=ridge: r(b.question))
            r2[f"ridge_{name}_a{alpha:g}"] = float(1 - ((ridge(q_val) - target) ** 2).sum() / total)
    qn = torch.nn.functional.normalize(q_train.float(), dim=-1)
    for k in (1, 5, 20, 100):
        def knn(b, k=k):
            sim = torch.nn.functional.normalize(b.question.float(), dim=-1) @ qn.T
            return z_train[sim.topk(k, dim=-1).indices].mean(1)
        rows[f"knn{k}"] = accuracy(knn)
    keys = [question_key(q) for q in adaptation.tasks["meta_train"]]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    val_questions = adaptation.tasks["meta_val"]

    def same_words(b):
        out = []
        for i in b.task_index.tolist():
            members = groups.get(question_key(val_questions[i]))
            out.append(z_train[members].mean(0) if members else z_train.mean(0))
        return torch.stack(out)

    rows["same_words"] = accuracy(same_words)
    for r in (0, 1):  # the nearest question's latent of one training row (a fresh random view), as a sampler would
        def knn_row(b, r=r):
            sim = torch.nn.functional.normalize(b.question.float(), dim=-1) @ qn.T
            return adaptation.train_latents[r][sim.argmax(-1)]
        rows[f"knn1_row{r}"] = accuracy(knn_row)
    lat = adaptation.train_latents.double()  # [rows, N, d]
    within = float(((lat - lat.mean(0)) ** 2).sum(-1).mean())
    between = float(((lat.mean(0) - lat.mean((0, 1))) ** 2).sum(-1).mean())
    sim_val = torch.nn.functional.normalize(q_val.float(), dim=-1) @ qn.T
    print(f"rows: within-task variance {within:.3f}, between-task variance of the row means {between:.3f}; "
          f"meta-val question -> nearest meta-train question cosine: median {float(sim_val.max(-1).values.median()):.4f}")
    rows |= sampled_rows(cfg, upstream, data, base, adaptation)
    width = max(map(len, rows))
    print(f"meta-val ({len(idx_val)} tasks): accuracy +- 95% CI; latent R^2 on meta-val for the ridge maps")
    for name, (mean, ci) in rows.items():
        extra = f"   R2 {r2[name]:+.3f}" if name in r2 else ""
        print(f"  {name:<{width}}  {mean:.4f} +- {ci:.4f}{extra}")


def sampled_rows(cfg, upstream, data, base, adaptation) -> dict[str, tuple[float, float]]:
    """This config's hyperldm artifact (if built): its samples at g = 0, 1, 4 for the first 128 meta-train and the
    meta-val questions, and each sample's distance to its own task's fine-tuned latent vs the other tasks'."""
    import json
    from pathlib import Path

    from metadiff.diffusion.sampling import cfg_eps, sample
    from metadiff.diffusion.schedule import NoiseSchedule
    from metadiff.nets.latent_denoiser import LatentDenoiser

    artifact = find_artifact(cfg, {k: a.fingerprint for k, a in upstream.items()})
    if artifact is None:
        return {}
    spec = json.loads(Path(artifact.file("denoiser.json")).read_text())
    state = torch.load(artifact.file("denoiser.pt"), weights_only=True)
    keys = ("hidden", "time_dim", "version", "head_on", "cond_norm")
    net = LatentDenoiser(spec["latent_dim"], spec["cond_dim"], **{k: spec[k] for k in keys if k in spec})
    net.load_state_dict(state["denoiser"])
    net.eval()
    mean, std = state["latent_mean"], state["latent_std"]
    schedule = NoiseSchedule.make(**spec["schedule"])
    s = cfg.model.sampling
    print(f"sampling {artifact.path.name}: {s.method}-{s.steps} {s.spacing}, clip {s.clip_x0}, "
          f"rescale {s.guidance_rescale}, prediction {spec['prediction']}")
    out = {}
    for split in ("meta_train", "meta_val"):
        batches = list(data.task_loader(data.episodes(split), 128, shuffle=False))[:1]
        truth = (adaptation.eval_latents[split] - mean) / std
        for g in (0.0, 1.0, 4.0):
            def draw(b, g=g, split=split, truth=truth):
                null = torch.zeros(1, b.question.shape[1])
                eps = lambda x, t: cfg_eps(net, x, t, b.question.float(), null, g,  # noqa: E731
                                           rescale=float(s.guidance_rescale))
                gen = torch.Generator().manual_seed(int(b.task_index[0]))
                with torch.no_grad():
                    x = sample(eps, schedule, schedule.set_timesteps(int(s.steps), s.spacing), shape=(b.n_tasks, len(mean)),
                               method=s.method, eta=float(s.eta), generator=gen, clip_x0=float(s.clip_x0),
                               reclip_guided=True, prediction=spec["prediction"])
                d = torch.cdist(x, truth)  # [tasks, all tasks of the split]
                own = d[torch.arange(b.n_tasks), b.task_index]
                rank = (d < own[:, None]).float().sum(1)
                print(f"  {split} g={g:g}: distance to own task {float(own.median()):.2f}, to others "
                      f"{float(d.median()):.2f}; own task's rank median {float(rank.median()):.0f} of {truth.shape[0]}")
                return x * std + mean
            out[f"{split}_sample_g{g:g}"] = accuracy_on(batches, base, draw)
        out[f"{split}_hnet_init"] = accuracy_on(batches, base, lambda b: base.initial_inner(b.question)["z"])
        out[f"{split}_oracle"] = accuracy_on(batches, base, lambda b, sp=split: adaptation.eval_latents[sp][b.task_index])
    return out


def accuracy_on(batches, base, predict) -> tuple[float, float]:
    accs = []
    with torch.no_grad():
        for b in batches:
            logits = base.latent_logits(predict(b), b.query_x, b.answers, b.answer_mask)
            accs.append(masked_task_accuracy(logits, b.query_y, b.query_mask))
    return mean_ci95(torch.cat(accs))


if __name__ == "__main__":
    main(sys.argv[1:])
