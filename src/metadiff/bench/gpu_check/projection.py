"""The projection: every stage of both real chains at its configured budget (composed configs: epochs, steps,
batch sizes, generation and evaluation counts, checkpoint cadence) and the real datasets' sizes
(conf/gpu_check.yaml `datasets`), timed with the throughputs the sections measured on this machine.

    time      = training steps x measured seconds per step (scaled to the configured batch where the check ran a
                smaller one: linear in the batch, an upper bound on a GPU that was not full)
                + the stage's sampling / fine-tune passes x measured seconds per image-step / task-step
                + checkpoint writes x measured checkpoint bytes / measured write rate
    disk      = its artifact + the checkpoint files it keeps + what it leaves in its run folder (pseudo data rounds)
    memory    = the peak of the section that ran its model (CUDA allocator on a GPU, process RSS on a CPU)

What a stage spends that no section measured is named in its `missing` list, not guessed. Every number is a
function of the inputs below, so a re-measured section re-projects every stage that uses it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import hydra
from omegaconf import DictConfig

from metadiff.bench.gpu_check.config import Settings

TARGETS = {"chain_a_one_gpu_s": 15 * 60, "chain_b_eight_gpus_s": 60 * 60, "checkpoint_io_share": 0.05}


@dataclass
class StageProjection:
    stage: str
    runs: int  # how many times the chain runs it (13 zoo members)
    steps: int | None  # training steps (or the stage's main unit, named in `basis`)
    seconds: float | None  # one run
    checkpoint_writes: float | None
    checkpoint_seconds: float | None
    disk_bytes: float | None  # one run
    memory_mib: float | None
    basis: str
    missing: list[str] = field(default_factory=list)
    checkpoint_bytes: float | None = None  # one checkpoint file (measured)
    train_seconds: float | None = None  # the training steps alone

    @property
    def checkpoint_bytes_written(self) -> float | None:
        if not self.checkpoint_writes or self.checkpoint_bytes is None:
            return None
        return self.checkpoint_writes * self.checkpoint_bytes

    @property
    def written_per_train_s(self) -> float | None:
        """Checkpoint bytes written per second of training (issue 31 asks for it before and after its fix)."""
        written = self.checkpoint_bytes_written
        return written / self.train_seconds if written is not None and self.train_seconds else None

    @property
    def io_share(self) -> float | None:
        if self.checkpoint_seconds is None or not self.seconds:
            return None
        return self.checkpoint_seconds / max(self.seconds - self.checkpoint_seconds, 1e-9)


def _get(results: dict[str, Any], section: str, *keys: str) -> Any:
    entry = results.get(section) or {}
    if entry.get("status") not in ("ok", "failed"):
        return None
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def _memory(results: dict[str, Any], section: str, device: str) -> float | None:
    return _get(results, section, "peak_cuda_mib" if device == "cuda" else "peak_rss_mib")


def checkpoint_plan(
    callbacks: DictConfig | None, epochs: int, validations: int, train_seconds: float, save_seconds: float | None
) -> tuple[float, int]:
    """(checkpoint writes over the run, files kept at its end) of the run's checkpoint callbacks as configured:
    `SpacedCheckpoint` (min_interval_s and max_io_fraction bound the writes), or Lightning's ModelCheckpoint (per
    `every_n_epochs`/`every_n_train_steps`/`train_time_interval`, at train-epoch ends or validation ends; a monitored
    one is counted as writing at every validation, its upper bound)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    writes, kept = 0.0, 0
    for node in (callbacks or {}).values():
        if node is None or "_target_" not in node:
            continue
        target = hydra.utils.get_class(node._target_)
        if not issubclass(target, ModelCheckpoint):
            continue
        if "min_interval_s" in node:  # SpacedCheckpoint: one last.ckpt, spaced by time and an I/O share
            interval = float(node.min_interval_s)
            if save_seconds is not None:
                interval = max(interval, save_seconds / float(node.max_io_fraction))
            writes += min(epochs, math.floor(train_seconds / interval)) if interval > 0 else epochs
            kept += 1
            continue
        top_k = int(node.get("save_top_k", 1))
        last = bool(node.get("save_last") or False)
        per_save = (1 if top_k != 0 else 0) + (1 if last else 0)
        saves: float | None
        if node.get("monitor"):
            saves = validations
        elif node.get("every_n_train_steps"):
            saves = None  # counted by the caller's steps: not known here, fall back to epochs
        elif node.get("train_time_interval"):
            saves = train_seconds / float(node.train_time_interval)
        else:
            saves = (
                epochs / int(node.get("every_n_epochs") or 1)
                if node.get("save_on_train_epoch_end", True)
                else validations
            )
        writes += per_save * (saves if saves is not None else epochs)
        kept += (top_k if top_k > 0 else 0) + (1 if last else 0)
    return writes, kept


class Projector:
    def __init__(self, settings: Settings, results: dict[str, Any], configs: dict[str, DictConfig]):
        self.s, self.r, self.c = settings, results, configs
        self.device = settings.device
        self.write_rate = _get(results, "adm_step", "checkpoint", "bytes_per_s")
        vqa = settings.spec.datasets.meta_vqa
        fraction = float(configs["hnet"].data.source.meta_val.fraction)
        self.n_val = max(1, round(fraction * vqa.meta_train_tasks)) if fraction > 0 else 0
        self.n_train, self.n_test = vqa.meta_train_tasks - self.n_val, vqa.meta_test_tasks

    # -- helpers ------------------------------------------------------------------------------------------------
    def _checkpoints(
        self,
        cfg: DictConfig,
        epochs: int,
        validations: int,
        train_s: float | None,
        ckpt_bytes: float | None,
        missing: list[str],
    ) -> tuple[float | None, float | None, int]:
        save_s = ckpt_bytes / self.write_rate if ckpt_bytes and self.write_rate else None
        writes, kept = checkpoint_plan(cfg.get("callbacks"), epochs, validations, train_s or 0.0, save_s)
        if writes and save_s is None:
            missing.append("checkpoint bytes or write rate")
        return writes, (writes * save_s if save_s is not None else None), kept

    def _finetune_seconds(self, task_steps: float, missing: list[str]) -> float:
        rate = _get(self.r, "hnet_step", "finetune_task_steps_per_s")
        if rate is None:
            missing.append("fine-tune rate (section hnet_step)")
            return 0.0
        return task_steps / rate

    def _step_seconds_hnet(self, tasks: int, inner: int) -> float | None:
        seconds = _get(self.r, "hnet_step", "seconds_per_step")
        measured_tasks, measured_inner = _get(self.r, "hnet_step", "tasks"), _get(self.r, "hnet_step", "inner_steps")
        if seconds is None:
            return None
        return seconds * (tasks / measured_tasks) * ((inner + 1) / (measured_inner + 1))

    def _chain_stage(self, task: str) -> dict[str, Any]:
        return _get(self.r, "vqa_chain", "stages", task) or {}

    # -- chain A --------------------------------------------------------------------------------------------------
    def features(self) -> StageProjection:
        cfg, vqa = self.c["features"], self.s.spec.datasets.meta_vqa
        missing: list[str] = []
        workers = _get(self.r, "features_pipeline", "workers") or {}
        configured = workers.get(str(int(cfg.data.num_workers)), {})
        rate = configured.get("images_per_s") or _get(self.r, "features_pipeline", "images_per_s")
        texts = self.n_train + self.n_val + self.n_test + vqa.answer_prompts
        text_rate = _get(self.r, "clip_throughput", "texts_per_s")
        seconds = None
        if rate:
            seconds = vqa.images / rate + (texts / text_rate if text_rate else 0.0)
        else:
            missing.append("pipeline throughput (section features_pipeline)")
        if not text_rate:
            missing.append("text throughput")
        dim = _get(self.r, "hnet_step", "embed_dim") or 0
        basis = (
            f"{vqa.images} images at {'the configured' if configured else 'the best'} worker count + "
            f"{texts} texts; store float32 x {dim}"
        )
        return StageProjection(
            "features_vqa",
            1,
            None,
            seconds,
            0,
            0.0,
            (vqa.images + texts) * dim * 4,
            _memory(self.r, "features_pipeline", self.device),
            basis,
            missing,
        )

    def _fewshot(self, key: str, task: str, inner_steps: int) -> StageProjection:
        cfg = self.c[key]
        missing: list[str] = []
        per_epoch = math.ceil(self.n_train / int(cfg.data.tasks_per_batch))
        epochs = int(cfg.trainer.max_epochs)
        steps = epochs * per_epoch
        if int(cfg.trainer.max_steps) > 0:
            steps = min(steps, int(cfg.trainer.max_steps))
        if key == "hnet":
            step_s = self._step_seconds_hnet(int(cfg.data.tasks_per_batch), inner_steps)
        else:  # the multitask learner has no inner loop: its step timed in the chain, scaled to the batch
            timing = self._chain_stage(task).get("timing") or {}
            measured = max(timing.get("batch_sizes") or [0]) or None
            step_s = (
                timing["median_step_seconds"] * int(cfg.data.tasks_per_batch) / measured
                if measured and timing.get("median_step_seconds")
                else None
            )
        if step_s is None:
            missing.append("step time")
        train_s = steps * step_s if step_s else None
        validations = epochs // int(cfg.trainer.check_val_every_n_epoch)
        limit = int(cfg.data.max_val_tasks) if cfg.data.max_val_tasks is not None else self.n_train
        eval_tasks = validations * (min(limit, self.n_train) + min(limit, self.n_val))
        test_tasks = self.n_test * (1 + int(cfg.model.n_shot_max) * int(cfg.model.n_shot_reruns))
        eval_s = self._finetune_seconds((eval_tasks + test_tasks) * int(cfg.model.eval_steps), missing)
        stage = self._chain_stage(task)
        ckpt = stage.get("checkpoint_bytes")
        writes, io_s, kept = self._checkpoints(cfg, epochs, validations, train_s, ckpt, missing)
        seconds = None if train_s is None else train_s + eval_s + (io_s or 0.0)
        disk = (stage.get("artifact_bytes") or 0) + kept * (ckpt or 0)
        memory = _memory(self.r, "hnet_step", self.device)
        basis = (
            f"{steps} steps ({epochs} epochs x {per_epoch}), {validations} validations, "
            f"{eval_tasks + test_tasks} evaluation fine-tunes x {cfg.model.eval_steps} steps"
        )
        return StageProjection(task, 1, steps, seconds, writes, io_s, disk, memory, basis, missing, ckpt, train_s)

    def hnet(self) -> StageProjection:
        return self._fewshot("hnet", "hnet_vqa", int(self.c["hnet"].model.inner.steps))

    def multitask(self) -> StageProjection:
        return self._fewshot("multitask", "multitask_vqa", 0)

    def adaptation(self) -> StageProjection:
        cfg, hnet = self.c["adaptation"], self.c["hnet"]
        missing: list[str] = []
        finetunes = int(cfg.model.rows) * self.n_train + self.n_train + self.n_val + self.n_test
        seconds = self._finetune_seconds(finetunes * int(cfg.model.inner.steps), missing)
        latent = int(hnet.model.learner.embedding_dim)
        disk = 2 * finetunes * latent * 4  # the chunks in its work folder and the assembled artifact
        return StageProjection(
            "adaptation_vqa",
            1,
            finetunes,
            seconds if not missing else None,
            0,
            0.0,
            disk,
            _memory(self.r, "hnet_step", self.device),
            f"{finetunes} fine-tunes x {cfg.model.inner.steps} steps (rows x meta-train + every task once)",
            missing,
        )

    def hyperldm(self) -> StageProjection:
        cfg = self.c["hyperldm"]
        missing = ["validation and test sampling"]
        rows = cfg.data.rows_per_epoch if cfg.data.rows_per_epoch is not None else int(self.c["adaptation"].model.rows)
        per_epoch = math.ceil(int(rows) * self.n_train / int(cfg.data.latents_per_batch))
        epochs = int(cfg.trainer.max_epochs)
        steps = epochs * per_epoch
        stage = self._chain_stage("hyperldm_vqa")
        timing = stage.get("timing") or {}
        step_s = timing.get("median_step_seconds")
        if step_s is None:
            missing.append("step time")
        train_s = steps * step_s if step_s else None
        validations = epochs // int(cfg.trainer.check_val_every_n_epoch)
        ckpt = stage.get("checkpoint_bytes")
        writes, io_s, kept = self._checkpoints(cfg, epochs, validations, train_s, ckpt, missing)
        seconds = None if train_s is None else train_s + (io_s or 0.0)
        disk = (stage.get("artifact_bytes") or 0) + kept * (ckpt or 0)
        return StageProjection(
            "hyperldm_vqa",
            1,
            steps,
            seconds,
            writes,
            io_s,
            disk,
            stage.get("peak_cuda_mib" if self.device == "cuda" else "peak_rss_mib"),
            f"{steps} steps ({epochs} epochs x {per_epoch}) at the chain's measured step "
            "(a tiny MLP: launch-bound, not batch-bound)",
            missing,
            ckpt,
            train_s,
        )

    # -- chain B --------------------------------------------------------------------------------------------------
    def _image_step(self, section: str, missing: list[str]) -> float | None:
        value = _get(self.r, section, "seconds_per_image_step")
        if value is None:
            missing.append(f"seconds per image-step (section {section})")
        return value

    def unet(self) -> StageProjection:
        cfg, stats = self.c["unet"], self.s.spec.datasets.miniimagenet
        missing: list[str] = []
        batch = int(cfg.data.train.batch_size)
        images = int(cfg.data.class_subset.classes_per_model) * (
            stats.images_per_class - int(cfg.data.train.holdout_per_class)
        )
        per_epoch = images // batch
        steps = (
            int(cfg.trainer.max_steps) if int(cfg.trainer.max_steps) > 0 else int(cfg.trainer.max_epochs) * per_epoch
        )
        epochs = math.ceil(steps / per_epoch)
        measured = _get(self.r, "adm_step", "seconds_per_step")
        measured_batch = _get(self.r, "adm_step", "batch_size")
        train_s = steps * measured * batch / measured_batch if measured else None
        if train_s is None:
            missing.append("step time (section adm_step)")
        validations = epochs // int(cfg.trainer.check_val_every_n_epoch)
        holdout = int(cfg.data.class_subset.classes_per_model) * int(cfg.data.train.holdout_per_class)
        image_step = self._image_step("guided_ddim", missing) or 0.0
        eval_s = image_step * (validations * holdout + holdout + int(cfg.model.grid.n) * int(cfg.model.grid.steps))
        ckpt = _get(self.r, "adm_step", "checkpoint", "bytes")
        writes, io_s, kept = self._checkpoints(cfg, epochs, validations, train_s, ckpt, missing)
        weights = _get(self.r, "adm_step", "checkpoint", "weights_bytes") or 0
        seconds = None if train_s is None else train_s + eval_s + (io_s or 0.0)
        return StageProjection(
            "diffusion_unet_miniimagenet",
            int(self.c["zoo"].zoo.n_models),
            steps,
            seconds,
            writes,
            io_s,
            weights + kept * (ckpt or 0),
            _memory(self.r, "adm_step", self.device),
            f"{steps} steps of batch {batch} ({epochs} epochs of {per_epoch}), {validations} validations, a test grid",
            missing,
            ckpt,
            train_s,
        )

    def zoo(self) -> StageProjection:
        cfg = self.c["zoo"]
        missing = ["the judge's test on held-out images"]
        n = int(cfg.zoo.n_models)
        image_steps = n * int(cfg.model.check.n_per_model) * int(cfg.model.check.steps)
        image_step = self._image_step("guided_ddim", missing)
        seconds = image_steps * image_step if image_step is not None else None
        member = _get(self.r, "guided_ddim", "zoo_weight_bytes")
        members = _get(self.r, "guided_ddim", "members")
        disk = member / members * n if member and members else None
        return StageProjection(
            "diffusion_zoo_miniimagenet",
            1,
            image_steps,
            seconds,
            0,
            0.0,
            disk,
            _memory(self.r, "guided_ddim", self.device),
            f"check: {n} members x {cfg.model.check.n_per_model} samples x "
            f"{cfg.model.check.steps} DDIM steps (image-steps)",
            missing,
        )

    def dfml(self) -> StageProjection:
        cfg, zoo = self.c["dfml"], self.c["zoo"]
        missing = ["meta-model / class-learner training steps", "validation episodes", "checkpoint bytes"]
        gen = cfg.model.generation
        epochs = int(cfg.trainer.max_epochs)
        rounds = math.ceil(epochs / int(gen.every))
        classes = int(zoo.zoo.n_models) * int(zoo.zoo.classes_per_model)
        image_steps = rounds * classes * int(gen.per_class) * int(gen.steps)
        image_step = self._image_step("guided_ddim", missing)
        seconds = image_steps * image_step if image_step is not None else None
        side, channels = int(self.c["unet"].model.image_size), int(self.c["unet"].model.channels)
        disk = rounds * classes * int(gen.per_class) * channels * side * side  # every round's uint8 pseudo data
        return StageProjection(
            "dfml_miniimagenet",
            1,
            image_steps,
            seconds,
            None,
            None,
            disk,
            _memory(self.r, "guided_ddim", self.device),
            f"generation: {rounds} rounds x {classes} classes x {gen.per_class} images x "
            f"{gen.steps} guided DDIM steps (image-steps, fp32 as the stage runs it)",
            missing,
        )

    def diffusionmix(self) -> StageProjection:
        cfg, zoo = self.c["diffusionmix"], self.c["zoo"]
        missing = ["the per-episode heads (small MLPs)"]
        mix, episodes = cfg.model.mix, cfg.data.episodes
        t = int(mix.t)
        passes = t + 1 if mix.denoise_steps is None else int(mix.denoise_steps)
        support = sum(int(episodes.n_way) * int(k) for k in episodes.shots)
        image_steps = int(episodes.n_episodes) * int(zoo.zoo.n_models) * support * passes
        image_step = self._image_step("diffusionmix_step", missing)
        seconds = image_steps * image_step if image_step is not None else None
        return StageProjection(
            "diffusionmix_miniimagenet",
            1,
            image_steps,
            seconds,
            0,
            0.0,
            0,
            _memory(self.r, "diffusionmix_step", self.device),
            f"{episodes.n_episodes} episodes x {zoo.zoo.n_models} members x {support} support "
            f"images x {passes} ancestral steps (image-steps)",
            missing,
        )

    # -- both ---------------------------------------------------------------------------------------------------
    def project(self) -> dict[str, Any]:
        chain_a = [self.features(), self.hnet(), self.multitask(), self.adaptation(), self.hyperldm()]
        chain_b = [self.unet(), self.zoo(), self.dfml(), self.diffusionmix()]
        total_a = _total(chain_a)
        member = chain_b[0]
        waves = math.ceil(member.runs / 8)
        later = [p.seconds for p in chain_b[1:] if p.seconds is not None]
        total_b = _total(chain_b)
        eight = None
        if member.seconds is not None and len(later) == len(chain_b) - 1:
            # 8 GPUs: the members as parallel one-GPU jobs (in waves), the later stages' passes split over 8 ranks
            eight = waves * member.seconds + later[0] + (later[1] + later[2]) / 8
        out = {
            "chain_a": [_row(p) for p in chain_a],
            "chain_b": [_row(p) for p in chain_b],
            "totals": {
                "chain_a_one_device_s": total_a,
                "chain_b_one_device_s": total_b,
                "chain_b_eight_devices_s": eight,
                "chain_b_eight_devices_basis": f"{member.runs} members in {waves} waves of 8 one-GPU jobs, dfml and diffusionmix "
                "split evenly over 8 ranks (ideal), the zoo check on one",
            },
            "targets": TARGETS,
            "device": self.device,
        }
        if self.device == "cuda":
            out["meets"] = {
                "chain_a_one_gpu": total_a is not None and total_a <= TARGETS["chain_a_one_gpu_s"],
                "chain_b_eight_gpus": eight is not None and eight <= TARGETS["chain_b_eight_gpus_s"],
                "checkpoint_io": all(
                    p.io_share is None or p.io_share <= TARGETS["checkpoint_io_share"] for p in chain_a + chain_b
                ),
            }
        return out


def _total(stages: list[StageProjection]) -> float | None:
    known = [(p.seconds, p.runs) for p in stages if p.seconds is not None]
    if len(known) < len(stages):
        return None
    return sum(seconds * runs for seconds, runs in known)


def _row(p: StageProjection) -> dict[str, Any]:
    return {
        **asdict(p),
        "io_share": p.io_share,
        "checkpoint_bytes_written": p.checkpoint_bytes_written,
        "written_per_train_s": p.written_per_train_s,
    }


def project(settings: Settings, results: dict[str, Any], compose) -> dict[str, Any]:
    """The projection of both chains; `compose(experiment)` gives an experiment's config as this check runs it."""
    e = settings.spec.experiments
    configs = {
        name: compose(getattr(e, name))
        for name in ("features", "hnet", "multitask", "adaptation", "hyperldm", "unet", "zoo", "dfml", "diffusionmix")
    }
    return Projector(settings, results, configs).project()
