"""The run loop end to end through the real entry point: every experiment, multirun, W&B, determinism (DDP and
resume: tests/test_parity.py, tests/test_sweeps.py, tests/test_resume.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import (
    CONF_DIR,
    EXPERIMENTS,
    FEWSHOT_STAGES,
    LATENT_STAGES,
    compose_config,
    image_bench,
    parse_summary,
    run_metrics,
    run_train,
    smoke_budget,
    smoke_overrides,
    stage_family,
    written_artifacts,
)

# CIFAR-FS runs the same stages as miniImageNet on the same fixture tree (only the folder reader differs, which
# tests/test_images.py checks; tests/test_config.py composes and validates its experiments): no smoke run of its own.
# The default experiment's smoke run is tests/test_default_run.py's: the default command, complete on the same short
# chain (a second, fast_dev_run smoke run of the same stage on the same chain would add nothing but a minute of CI).
SMOKE = [e for e in EXPERIMENTS if "_cifarfs" not in e and e != "hyperldm_synthvqa_demo"]
# Smoke runs that share an upstream chain run on one xdist worker, one after the other, instead of one worker idling
# on the build lock while the other builds it: the features, few-shot and latent stages on synthvqa share the
# features store of the short chain with tests/test_latent_stages.py and tests/test_hyperldm.py; the *_vqa runs share
# the fixture chain.
SYNTHVQA_CHAIN = pytest.mark.xdist_group("synthvqa_latent_chain")
VQA_CHAIN = pytest.mark.xdist_group("vqa_chain")


def _chain_group(experiment: str) -> tuple[pytest.MarkDecorator, ...]:
    if experiment.endswith("_vqa"):
        return (VQA_CHAIN,)
    if image_bench(experiment) == "synthvqa" and stage_family(experiment) in (
        "features",
        *LATENT_STAGES,
        *FEWSHOT_STAGES,
    ):
        return (SYNTHVQA_CHAIN,)
    return ()


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=_chain_group(e)) for e in SMOKE])
def test_every_experiment_runs_with_fast_dev_run(
    experiment: str, cache_root: Path, vqa_tree: dict, image_tree: Path
) -> None:
    """The smoke run of every experiment: its smoke budget from conf/debug with fast_dev_run (a complete run at that
    budget for the features and adaptation stages, whose fast_dev_run publishes nothing), on the fixture data. The
    run publishes its own artifact, last, and every metric in it is a finite number."""
    proc = run_train([f"experiment={experiment}", *smoke_overrides(experiment, vqa_tree, image_tree)], cache_root)
    written = written_artifacts(proc.stdout + proc.stderr)
    assert written, f"{experiment}: no artifact written\n{proc.stderr[-3000:]}"
    own = written[-1]  # the run publishes after every upstream it built
    assert (own.parent.name, own.name.rsplit("-", 1)[0]) == (stage_family(experiment), experiment), own
    metrics = run_metrics(proc, stage_family(experiment))
    assert not {k: v for k, v in metrics.items() if not math.isfinite(v)}, metrics
    assert [k for k in metrics if not k.startswith(("time/", "sys/"))], f"{experiment}: no metric of the stage's own"
    assert "time/run_seconds" in parse_summary(proc.stdout)


# (experiment, a downstream experiment, the name of its upstream entry that builds that experiment): a smoke chain
# through a stage must give it the stage's own smoke budget. The features and adaptation stages' smoke runs are
# complete: they publish the very artifact the chain uses. The others' differ from their upstream entries in training
# steps only (fast_dev_run, one step of a member or judge, 2 steps an epoch of a dfml upstream).
SMOKE_CHAINS = [
    ("features_synthvqa", "hnet_synthvqa", "features"),
    ("adaptation_synthvqa", "hyperldm_synthvqa", "adaptation"),
    ("features_vqa", "hnet_vqa", "features"),
    ("features_vqa", "hyperldm_vqa", "features"),
    ("adaptation_vqa", "hyperldm_vqa", "adaptation"),
    *(
        chain
        for bench in ("glyphs", "miniimagenet", "cifarfs")
        for chain in (
            (f"classifier_{bench}", f"diffusion_zoo_{bench}", "judge"),
            (f"classifier_{bench}", f"dfml_{bench}", "reference"),
            (f"diffusion_unet_{bench}", f"diffusion_zoo_{bench}", "unet0"),
            (f"diffusion_zoo_{bench}", f"dfml_{bench}", "zoo"),
            (f"diffusion_zoo_{bench}", f"diffusionmix_{bench}", "zoo"),
            (f"dfml_{bench}", f"diffusionmix_{bench}", "meta"),
            (f"dfml_{bench}_5shot", f"diffusionmix_{bench}_5shot", "meta"),
        )
    ),
]


@pytest.mark.parametrize(("experiment", "downstream", "name"), SMOKE_CHAINS)
def test_a_smoke_chain_gives_each_stage_its_own_smoke_budget(
    experiment: str, downstream: str, name: str, tmp_path: Path, vqa_tree: dict, image_tree: Path
) -> None:
    """conf/debug holds each stage's smoke budget twice: as the run's settings (smoke_<stage>) and as the override
    strings of a downstream smoke chain (`upstream_overrides` of smoke_images, smoke_vqa, short_chain). Both compose
    to the same stage, so the strings cannot drift from the settings; every smoke config validates."""
    from metadiff.config import validate_config
    from metadiff.pipeline import compose_upstream
    from metadiff.store import config_fingerprint

    def data(e: str) -> dict | Path | None:
        return vqa_tree if e.endswith("_vqa") else image_tree

    own = compose_config([f"experiment={experiment}", *smoke_budget(experiment, data(experiment))], tmp_path, tmp_path)
    validate_config(own)
    chain = smoke_overrides(downstream, vqa_tree, image_tree)
    chain = compose_config([f"experiment={downstream}", *chain], tmp_path, tmp_path)
    validate_config(chain)
    built = compose_upstream(chain, name)
    assert built.task_name == experiment
    if stage_family(experiment) in ("features", "adaptation"):
        assert config_fingerprint(own) == config_fingerprint(built)
        return
    # a judge or reference trains 8 epochs where the classifier trains 15, a dfml upstream 2 steps an epoch: training
    # lengths, which the smoke run's fast_dev_run overrides anyway
    length = {"model": [("scheduler", "T_max")], "data": [("train", "steps_per_epoch")]}
    for section in ("model", "data", "zoo"):
        a, b = (OmegaConf.to_container(c[section], resolve=True) if section in c else {} for c in (own, built))
        for node, key in length.get(section, []):
            for tree in (a, b):
                tree.get(node, {}).pop(key, None)
        assert a == b, section


def test_smoke_vqa_holds_short_chains_budget_of_every_vqa_stage() -> None:
    """smoke_vqa restates short_chain's budget of each *_vqa stage (its entries add the fixture's data settings): Hydra
    replaces a list on merge, so selecting both would not add them up."""
    short, smoke = (
        OmegaConf.to_container(OmegaConf.load(CONF_DIR / "debug" / f"{name}.yaml").upstream_overrides)
        for name in ("short_chain", "smoke_vqa")
    )
    vqa = [name for name in short if name.endswith("_vqa")]
    assert vqa and all(set(short[name]) <= set(smoke[name]) for name in vqa), {n: list(smoke[n]) for n in vqa}


def test_chained_upstream_is_built_once_and_cached(cache_root: Path) -> None:
    args = ["experiment=features_synthvqa", "synthvqa_clip=trained", "debug=fdr"]
    run_train(args, cache_root)  # builds the CLIP upstream if missing
    again = run_train(args, cache_root)
    assert "upstream 'clip': using" in again.stdout + again.stderr, "the CLIP artifact was not reused"
    assert "building it now" not in again.stdout + again.stderr


def test_missing_upstream_without_build_names_the_command(tmp_path: Path) -> None:
    proc = run_train(
        ["experiment=features_synthvqa", "synthvqa_clip=trained", "debug=fdr", "upstream.clip.build_if_missing=false"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "build it first with: python train.py experiment=clip_synthvqa" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_multirun_runs_two_jobs(cache_root: Path, tmp_path: Path) -> None:
    proc = run_train(
        ["-m", "experiment=clip_synthvqa", "debug=fdr", "seed=1,2", f"hydra.sweep.dir={tmp_path}/sweep"], cache_root
    )
    assert proc.stdout.count("== clip_synthvqa (clip) finished") == 2
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "resolved_config.yaml").is_file()


SHORT = [
    "experiment=clip_synthvqa",
    "data.n_train_pairs=128",
    "data.batch_size=32",
    "data.n_val_tasks=10",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]


def test_wandb_offline_writes_local_run_and_exits_cleanly(cache_root: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "wandb_run"
    proc = run_train([*SHORT, "logger=wandb", f"hydra.run.dir={out_dir}"], cache_root)
    runs = list((out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {out_dir / 'wandb'}"
    assert list(runs[0].glob("*.wandb")), "the offline run has no data file"
    assert proc.returncode == 0


def test_same_seed_same_metrics(cache_root: Path) -> None:
    a = run_metrics(run_train([*SHORT, "seed=7", "test=false"], cache_root), "clip")
    b = run_metrics(run_train([*SHORT, "seed=7", "test=false"], cache_root), "clip")
    c = run_metrics(run_train([*SHORT, "seed=8", "test=false"], cache_root), "clip")
    for key in ("train/loss", "val/zeroshot_acc"):
        assert a[key] == b[key], key
    assert a["train/loss"] != c["train/loss"]


def test_pickled_cifarfs_gives_the_same_run_as_its_folders(tmp_path: Path, image_tree: Path) -> None:
    """MetaOptNet's CIFAR_FS_<split>.pickle files holding the folder set's pixels, in its order, are the same data:
    the classifier's smoke run on them reports the folder run's metrics exactly."""
    import pickle

    import numpy as np
    from PIL import Image
    from torchvision.datasets.folder import find_classes, make_dataset

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for split, name in (("meta_train", "train"), ("meta_val", "val"), ("meta_test", "test")):
        _, class_to_idx = find_classes(str(image_tree / split))
        samples = make_dataset(str(image_tree / split), class_to_idx, extensions=(".png",))
        data = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in samples])
        labels = [100 + label for _, label in samples]  # global labels, as MetaOptNet's files hold them
        (pickled / f"CIFAR_FS_{name}.pickle").write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=2))
    base = ["experiment=classifier_cifarfs", *smoke_overrides("classifier_cifarfs", {}, image_tree)]
    folder = run_metrics(run_train(base, tmp_path / "a"), "classifier")
    from_pickles = run_metrics(run_train([*base, f"paths.cifarfs_dir={pickled}"], tmp_path / "b"), "classifier")
    assert "data.source.format" not in " ".join(base)  # auto: folders there, pickles here
    scores = {k: v for k, v in folder.items() if k.startswith("test/") and "seconds" not in k}
    assert scores and scores == {k: from_pickles[k] for k in scores}, (scores, from_pickles)


@pytest.mark.parametrize("experiment", ["classifier_miniimagenet", "dfml_miniimagenet"])
def test_resnet12_backbone_runs_in_the_image_stages(experiment: str, tmp_path: Path, image_tree: Path) -> None:
    """`model/backbone=resnet12` swaps the whole backbone node (the Conv4 keys null) and the stage trains and tests
    with its 512-d (here 16-d) features."""
    small = ["model/backbone=resnet12", "model.backbone.widths=[8,8,8,16]"]
    proc = run_train([f"experiment={experiment}", *smoke_overrides(experiment, {}, image_tree), *small], tmp_path)
    assert any(k.startswith("test/") for k in run_metrics(proc, experiment.split("_")[0])), proc.stdout[-2000:]
    from omegaconf import OmegaConf

    own = min((tmp_path / "outputs" / "logs").rglob("config.yaml"), key=lambda p: len(p.parts))  # not an upstream's
    config = OmegaConf.load(own)
    assert config.task_name == experiment
    assert OmegaConf.to_container(config.model.backbone) == {
        "name": "resnet12",
        "width": None,
        "depth": None,
        "widths": [8, 8, 8, 16],
        "drop": 0.1,
        "block_size": 4,
        "anneal_calls": 40000,
    }
