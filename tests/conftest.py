"""Shared fixtures: composing the real config tree, running `train.py`, and one cache of generated data."""

from __future__ import annotations

import json
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
    os.environ["OMP_NUM_THREADS"] = "1"  # in the train.py subprocesses (inherited), instead of 4 threads fighting
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long work first: the slow end-to-end checks and the tests of a shared chain (an `xdist_group`, which one
    worker runs in a row), then the rest, each in file order. `make test` hands tests to its 2 workers in this order,
    so the short tests fill the gaps at the end instead of one worker finishing a 2-minute check alone."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") or item.get_closest_marker("xdist_group") else 1)


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


def vqa_data(tree: dict[str, Path]) -> list[str]:
    """Where the VQA fixture lives: its VQA v2 and COCO trees, its prompt file and the folder of its tiny CLIP's weights
    (`metadiff-tiny-vit.pt`, which `debug=smoke_features_vqa` and `smoke_vqa` read as features_vqa's
    `${paths.checkpoints_dir}/${model.arch}.pt`). Data locations only: the budgets are in conf/debug/."""
    return [
        f"paths.vqa_dir={tree['vqa_dir']}",
        f"paths.coco_dir={tree['coco_dir']}",
        f"data.source.prompts={tree['prompts']}",
        f"paths.checkpoints_dir={tree['checkpoint'].parent}",
    ]


FEWSHOT_STAGES = ("multitask", "maml", "hnet")
LATENT_STAGES = ("adaptation", "vae", "hyperclip", "hyperldm")


def debug(*options: str) -> str:
    """One `debug=` override selecting every option given: Hydra merges a list of options of a group in order, where a
    second `debug=` override would replace the first (e.g. the short chain and the kill drill)."""
    return f"debug=[{','.join(options)}]"


def with_debug(args: list[str], *options: str) -> list[str]:
    """`args` with `options` added to the `debug=` choice they already make, if any (see `debug`)."""
    chosen = [o for a in args if a.startswith("debug=") for o in a.removeprefix("debug=").strip("[]").split(",") if o]
    return [*(a for a in args if not a.startswith("debug=")), debug(*chosen, *options)]


def short_chain(bench: str, tree: dict[str, Path] | None = None, *also: str) -> list[str]:
    """Every upstream stage of the latent stages short, plus the `debug` options in `also`: `debug=short_chain` on
    synthvqa; on the VQA fixture `debug=smoke_vqa` (short_chain's budgets with the fixture's settings) and where the
    fixture's data lives."""
    if bench == "synthvqa":
        return [debug("short_chain", *also)]
    assert tree is not None
    return [debug("smoke_vqa", *also), *vqa_data(tree)]


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


def stage_family(experiment: str) -> str:
    """The stage an experiment runs, read from its name: `diffusion_unet_glyphs` -> `diffusion_unet`,
    `hyperldm_hvae_synthvqa` (the HVAE route) -> `hyperldm`."""
    return experiment.removesuffix("_5shot").removesuffix("_demo").rsplit("_", 1)[0].removesuffix("_hvae")


# The smoke budget of each image stage (conf/debug/smoke_<stage>.yaml; docs/testing.md has the table)
IMAGE_SMOKE = {
    "classifier": "smoke_images",
    "diffusion_unet": "smoke_diffusion_unet",
    "diffusion_zoo": "smoke_diffusion_zoo",
    "dfml": "smoke_dfml",
    "diffusionmix": "smoke_diffusionmix",
}
# Stages whose fast_dev_run publishes nothing (one batch of a feature store, one chunk of an adaptation dataset): their
# smoke run is a complete run at the smoke budget
COMPLETE_SMOKE = ("features", "adaptation")


# The options beside the chain's budget for a latent or few-shot stage on synthvqa / the VQA fixture
SMOKE_EVAL = {
    "adaptation": ("smoke_adaptation",),
    **{stage: ("smoke_tasks",) for stage in FEWSHOT_STAGES},
    "hyperldm": ("smoke_hyperldm",),
}


def smoke_options(experiment: str) -> list[str]:
    """The conf/debug options that hold `experiment`'s smoke budget (fast_dev_run aside)."""
    stage, bench = stage_family(experiment), image_bench(experiment)
    if bench in ("synthvqa", "vqa"):
        chain = "short_chain" if bench == "synthvqa" else "smoke_vqa"
        if stage == "features":  # features_synthvqa: the short CLIP of its upstream; features_vqa has none
            return [chain if bench == "synthvqa" else "smoke_features_vqa"]
        return [chain, *SMOKE_EVAL.get(stage, ())]
    if stage == "diffusion_unet" and bench != "glyphs":
        return ["smoke_diffusion_unet_folders"]
    option = IMAGE_SMOKE[stage] + ("_5shot" if stage == "dfml" and experiment.endswith("_5shot") else "")
    return [option] if bench == "glyphs" else [option, "smoke_folders"]


def smoke_data(experiment: str, data: dict[str, Path] | Path | None) -> list[str]:
    """Where the fixture data of `experiment` lives: the VQA tree (`vqa_tree`) of the *_vqa experiments, the image
    folder tree (`image_tree`) of the miniImageNet/CIFAR-FS ones; nothing for the embedded synthvqa and glyphs."""
    bench = image_bench(experiment)
    if bench == "vqa":
        assert isinstance(data, dict), f"{experiment} reads the VQA fixture tree"
        return vqa_data(data)
    if bench in ("miniimagenet", "cifarfs"):
        assert isinstance(data, Path), f"{experiment} reads an image folder tree"
        return [f"paths.{bench}_dir={data}"]
    return []


def smoke_budget(experiment: str, data: dict[str, Path] | Path | None = None, *also: str) -> list[str]:
    """`experiment`'s smoke budget (`debug=` its conf/debug options, then the options in `also`, e.g. `fdr`, `kill`)
    and where its fixture data lives (`smoke_data`): for tests that run a stage at the smoke budget with settings of
    their own. Append `experiment=...` yourself."""
    return [debug(*smoke_options(experiment), *also), *smoke_data(experiment, data)]


def smoke_overrides(
    experiment: str, tree: dict[str, Path] | None = None, images: Path | None = None, *also: str
) -> list[str]:
    """A smoke run of `experiment`: its smoke budget with fast_dev_run (`debug=fdr`; a complete run for the stages
    whose fast_dev_run publishes nothing, `COMPLETE_SMOKE`), on the fixture data (`tree`: *_vqa, `images`: the image
    folder sets)."""
    fdr = () if stage_family(experiment) in COMPLETE_SMOKE else ("fdr",)
    data = tree if image_bench(experiment) == "vqa" else images
    return smoke_budget(experiment, data, *fdr, *also)


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


def run_train(
    args: list[str],
    root: Path,
    timeout: int = 900,
    check: bool = True,
    env: dict[str, str] | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """Run the real entry point `python train.py ...` in its own process (`env`: extra environment variables;
    `fresh`: a new interpreter instead of a fork of the worker's warm one, see train_process.py)."""
    argv = [*args, f"paths.root_dir={root}", "hydra.job.chdir=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = run_entry_point(argv, env, timeout, fresh=fresh)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def written_artifacts(log: str) -> list[Path]:
    """Every artifact a run reports writing (its `artifact written: <dir>` log lines), in order: the upstreams it built
    first, its own last; one per job of a multirun. Read from the run's own log, so tests sharing a cache never pick
    up an artifact that another test wrote into the same stage dir."""
    return [Path(p) for p in re.findall(r"artifact written: (\S+)", log)]


def written_artifact(log: str, stage: str) -> Path:
    """The last artifact of `stage` that a run reports writing."""
    paths = [p for p in written_artifacts(log) if p.parent.name == stage]
    assert paths, f"the run wrote no {stage} artifact"
    return paths[-1]


def _log(run: subprocess.CompletedProcess | str) -> str:
    return run if isinstance(run, str) else run.stdout + run.stderr


def _manifest_metrics(path: Path) -> dict[str, float]:
    return json.loads((path / "manifest.json").read_text())["metrics"]


def run_metrics(run: subprocess.CompletedProcess | str, stage: str | None = None) -> dict[str, float]:
    """A run's final metrics at full precision: `metrics` of the manifest.json of the last artifact it wrote (of
    `stage`, if given); the top-level stage publishes after every upstream it built, so that is the run's own.

    The source of truth is the artifact: every experiment publishes one (`artifact: {}`) with the metrics `metadiff.run`
    returns, as floats. The printed summary (`parse_summary`) rounds them to 4 decimals, so it serves only the tests of
    what a run prints; a run that writes no artifact (a fast_dev_run feature store or adaptation dataset) has only it."""
    paths = [p for p in written_artifacts(_log(run)) if stage is None or p.parent.name == stage]
    assert paths, f"the run wrote no {stage or ''} artifact:\n{_log(run)[-3000:]}"
    return _manifest_metrics(paths[-1])


def task_metrics(run: subprocess.CompletedProcess | str, task: str) -> list[dict[str, float]]:
    """`run_metrics` of every artifact written for task `task` (`<stage>/<task>-<fingerprint>`), in order: one per job
    of a multirun; not those of upstream stages built along the way. Under `trainer=ddp_cpu` only rank 0 publishes:
    what every rank printed is `summaries`."""
    return [_manifest_metrics(p) for p in written_artifacts(_log(run)) if p.name.rsplit("-", 1)[0] == task]


TWO_RANKS = "Starting with 2 processes"  # Lightning's rank-0 line once 2 DDP ranks have joined


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
    """The metrics block that `metadiff.run` prints at the end of a run (the last one, for chained runs), rounded to 4
    decimals: for tests of what a run prints. Metric values: `run_metrics`."""
    return _metrics(stdout.split("== ")[-1])


def summaries(stdout: str, task: str) -> list[dict[str, float]]:
    """Every metrics block printed for task `task` (`== <task> (<stage>) finished: ==`), in order: one per rank under
    ddp_cpu (each rank runs the whole command, only rank 0 publishes); 4 decimals. Metric values: `task_metrics`."""
    return [_metrics(block) for block in stdout.split("== ")[1:] if block.startswith(f"{task} (")]
