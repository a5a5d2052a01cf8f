"""Shared fixtures: composing the real config tree, running `train.py`, and one cache of generated data."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train_process import run_entry_point

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one torch thread each, also
    os.environ["OMP_NUM_THREADS"] = "1"   # in the train.py subprocesses (inherited), instead of 4 threads fighting
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """One root for generated data and artifacts, shared by the whole session and by every xdist worker: an upstream
    chain is built once, by whichever worker needs it first, and the others wait for it (`utils.io.build_lock`).
    `METADIFF_TEST_CACHE=<dir>` shares it between sessions too; only for one checkout of the code (artifacts are
    keyed by config, not by code), which is how `.ci/run` uses it."""
    shared = os.environ.get("METADIFF_TEST_CACHE")  # CI: the slow set reuses what the fast set built (same code)
    if shared:
        root = Path(shared)
    elif worker_id == "master":
        return tmp_path_factory.mktemp("metadiff-root")
    else:
        root = tmp_path_factory.getbasetemp().parent / "metadiff-root"  # the workers' basetemps share this parent
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def vqa_tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny VQA v2 + COCO tree in the official layout and a tiny open_clip checkpoint file (tests/vqa_fixtures.py)."""
    import torch

    from metadiff.features.clip_models import create_clip
    from vqa_fixtures import write_vqa_tree

    root = tmp_path_factory.mktemp("vqa-tree")
    paths = write_vqa_tree(root)
    torch.manual_seed(0)
    paths["checkpoint"] = root / "metadiff-tiny-vit.pt"
    torch.save(create_clip("metadiff-tiny-vit").model.state_dict(), paths["checkpoint"])
    return paths


def vqa_overrides(tree: dict[str, Path]) -> list[str]:
    """Point a *_vqa experiment at the fixture tree, with the tiny CLIP instead of ViT-L/14."""
    return [f"paths.vqa_dir={tree['vqa_dir']}", f"paths.coco_dir={tree['coco_dir']}",
            f"data.source.prompts={tree['prompts']}", "model.arch=metadiff-tiny-vit",
            f"model.pretrained={tree['checkpoint']}", "data.num_workers=0"]


SHORT_CLIP_OVERRIDES = "['trainer.max_steps=2','data.n_train_pairs=512','data.n_val_tasks=5']"
SHORT_CLIP = f"upstream.clip.overrides={SHORT_CLIP_OVERRIDES}"
FEWSHOT_STAGES = ("multitask", "maml", "hnet")
LATENT_STAGES = ("adaptation", "vae", "hyperclip", "hyperldm")


def short_chain(bench: str, tree: dict[str, Path] | None = None) -> list[str]:
    """Short versions of every upstream stage of the latent stages (1-epoch HNET and multitask, 2 adaptation rows,
    2-epoch HyperCLIP),
    set at any depth of the chain through `upstream_overrides`."""
    out = [f"+upstream_overrides.hnet_{bench}=['trainer.max_epochs=1','model.n_shot_max=0']",
           f"+upstream_overrides.multitask_{bench}=['trainer.max_epochs=1','model.n_shot_max=0']",
           f"+upstream_overrides.adaptation_{bench}=['model.rows=2','model.inner.steps=3']",
           f"+upstream_overrides.hyperclip_{bench}=['trainer.max_epochs=2','model.guidance.steps=2']"]
    if bench == "synthvqa":
        return [*out, f"+upstream_overrides.clip_synthvqa={SHORT_CLIP_OVERRIDES}"]
    assert tree is not None
    paths, prompts, model = vqa_overrides(tree)[:2], vqa_overrides(tree)[2], vqa_overrides(tree)[3:5]
    out = [o.replace("=[", f"=['{prompts}',", 1) for o in out]
    out.append("+upstream_overrides.features_vqa=[" + ",".join(f"'{o}'" for o in (prompts, *model)) + "]")
    return [*paths, prompts, "data.num_workers=0", *out]


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny few-shot image set in the miniImageNet/CIFAR-FS folder layout: 8/5/5 classes of 20 random images."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("image-tree")
    rng = np.random.default_rng(0)
    for split, n_classes in (("meta_train", 8), ("meta_val", 5), ("meta_test", 5)):
        for c in range(n_classes):
            folder = root / split / f"n{c:04d}"
            folder.mkdir(parents=True)
            for j in range(20):
                pixels = rng.integers(0, 255, size=(10, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{j}.png")  # CIFAR-FS reads .png only
    return root


def _quoted(overrides: list[str]) -> str:
    return "[" + ",".join(f"'{o}'" for o in overrides) + "]"


def image_bench(experiment: str) -> str:
    """The benchmark of an experiment, its twins' suffixes aside: `dfml_glyphs_5shot` -> `glyphs`,
    `hyperldm_synthvqa_demo` -> `synthvqa`."""
    return experiment.removesuffix("_5shot").removesuffix("_demo").rsplit("_", 1)[1]


def image_smoke_overrides(experiment: str, tree: Path) -> list[str]:
    """Smoke settings of the data-free stages: tiny UNets and checks, short upstreams; folder sets read `tree`."""
    bench = image_bench(experiment)
    episodes = ["data.episodes.episodes_per_batch=2"]  # fast_dev_run tests 1 batch: 2 episodes, not 20
    data = episodes if bench == "glyphs" else [f"paths.{bench}_dir={tree}", "data.train.holdout_per_class=2",
                                               "data.num_workers=0", "data.train.batch_size=4", *episodes]
    grid = ["model.grid.n=2", "model.grid.steps=2"]
    tiny_unet = [*grid, *([] if bench == "glyphs" else ["model.unet.block_out_channels=[32,32,32,32]",
                                                        "model.unet.norm_num_groups=8", "model.unet.layers_per_block=1"])]
    zoo = ["zoo.n_models=2", "zoo.classes_per_model=3"]  # 6 pseudo classes: enough for 5-way dfml episodes
    if experiment.startswith("classifier_"):
        return data
    if experiment.startswith("diffusion_unet_"):
        return [*data, *zoo, *tiny_unet]
    member = [*data, "trainer.max_steps=1", *tiny_unet]
    return [*data, *zoo, "model.check.n_per_model=2", "model.check.steps=2", "model.grid.n_per_model=2",
            f"+upstream_overrides.diffusion_unet_{bench}={_quoted(member)}",
            f"+upstream_overrides.classifier_{bench}={_quoted([*data, 'trainer.max_steps=1', 'test=false'])}"]


def dfml_smoke_overrides(experiment: str, tree: Path) -> list[str]:
    """Smoke settings of dfml_* / diffusionmix_*: a 2x3 zoo of one-step members, a one-epoch dfml upstream."""
    bench = image_bench(experiment)
    twin = "_5shot" if experiment.endswith("_5shot") else ""
    zoo_run = image_smoke_overrides(f"diffusion_zoo_{bench}", tree)
    data = [o for o in zoo_run if o.startswith(("paths.", "data."))]
    nested = [o for o in zoo_run if o.startswith("+upstream_overrides.")]
    zoo_own = [o for o in zoo_run if o not in data and o not in nested and not o.startswith("zoo.")]
    zoo = [*data, *zoo_own, "zoo.n_models=2", "zoo.classes_per_model=3"]
    dfml = [*data, f"model.generation.per_class={11 if twin else 7}",  # 5-shot episodes need 5 + 6 per class "model.generation.batch_size=32", "model.generation.steps=2",
            "model.generation.every=1", "model.episodes.per_batch=2", "model.grid.per_class=2",
            "data.episodes.n_val_episodes=2"]
    overrides = [*nested, f"+upstream_overrides.diffusion_zoo_{bench}={_quoted(zoo)}", *dfml]
    if experiment.startswith("dfml_"):
        return overrides
    dfml_upstream = [*dfml, "trainer.max_epochs=1", "data.train.steps_per_epoch=2", "test=false"]
    return [*nested, f"+upstream_overrides.diffusion_zoo_{bench}={_quoted(zoo)}",
            f"+upstream_overrides.dfml_{bench}{twin}={_quoted(dfml_upstream)}", *data, "model.mix.denoise_steps=2",
            "model.head.clean_steps=2", "model.head.mix_steps=2", "model.head.final_steps=2"]


def smoke_overrides(experiment: str, tree: dict[str, Path], images: Path | None = None) -> list[str]:
    """What a smoke test of `experiment` adds: fixture data for *_vqa, short upstream stages for the rest."""
    if experiment.startswith(("dfml_", "diffusionmix_")):
        assert images is not None
        return dfml_smoke_overrides(experiment, images)
    if experiment.startswith(("classifier_", "diffusion_")):
        assert images is not None
        return image_smoke_overrides(experiment, images)
    stage, bench = experiment.split("_")[0], image_bench(experiment)
    if stage in LATENT_STAGES:
        return short_chain(bench, tree)
    downstream = stage in FEWSHOT_STAGES
    if experiment.endswith("_vqa"):
        if not downstream:
            return vqa_overrides(tree)
        overrides = vqa_overrides(tree)
        paths, model = overrides[:2], overrides[2:]
        return [*paths, "upstream.features.overrides=[" + ",".join(f"'{o}'" for o in model) + "]"]
    return [f'upstream.features.overrides=["{SHORT_CLIP}"]'] if downstream else []


def compose_config(overrides: list[str], root: Path, output_dir: Path) -> DictConfig:
    """The real config tree, composed as `train.py` would, with paths redirected into the test's folders."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*overrides, f"paths.root_dir={root}", f"paths.output_dir={output_dir}"],
            return_hydra_config=True,
        )
        HydraConfig().set_config(cfg)
    return cfg


def run_train(args: list[str], root: Path, timeout: int = 900, check: bool = True,
              env: dict[str, str] | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run the real entry point `python train.py ...` in its own process (`env`: extra environment variables;
    `fresh`: a new interpreter instead of a fork of the worker's warm one, see train_process.py)."""
    argv = [*args, f"paths.root_dir={root}", "hydra.job.chdir=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = run_entry_point(argv, env, timeout, fresh=fresh)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def written_artifact(log: str, stage: str) -> Path:
    """The artifact of `stage` that a run reports writing (its log line), so tests sharing a cache never pick up an
    artifact that another test wrote into the same stage dir."""
    paths = [Path(p) for p in re.findall(r"artifact written: (\S+)", log) if Path(p).parent.name == stage]
    assert paths, f"the run wrote no {stage} artifact"
    return paths[-1]


def _metrics(block: str) -> dict[str, float]:
    """The `name value` lines of one printed metrics block (its first line is the header)."""
    metrics: dict[str, float] = {}
    for line in block.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 2:
            try:
                metrics[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return metrics


def parse_summary(stdout: str) -> dict[str, float]:
    """The metrics block that `metadiff.run` prints at the end of a run (the last one, for chained runs)."""
    return _metrics(stdout.split("== ")[-1])


def summaries(stdout: str, task: str) -> list[dict[str, float]]:
    """Every metrics block printed for task `task` (`== <task> (<stage>) finished: ==`), in order: one per job of a
    multirun, one per rank under ddp_cpu; not the blocks of upstream stages built along the way."""
    return [_metrics(block) for block in stdout.split("== ")[1:] if block.startswith(f"{task} (")]
