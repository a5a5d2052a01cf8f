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
from omegaconf import DictConfig, OmegaConf

from train_process import run_entry_point

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one torch thread each, also
    os.environ["OMP_NUM_THREADS"] = "1"  # in the train.py subprocesses (inherited), instead of 4 threads fighting
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
    return [
        f"paths.vqa_dir={tree['vqa_dir']}",
        f"paths.coco_dir={tree['coco_dir']}",
        f"data.source.prompts={tree['prompts']}",
        "model.arch=metadiff-tiny-vit",
        f"model.pretrained={tree['checkpoint']}",
        "data.num_workers=0",
    ]


# The VQA fixture holds fewer meta-train tasks than a global batch: its task and latent stages train on one
# incomplete batch an epoch (with data.drop_last=true they would train nothing, and are refused)
FIXTURE_BATCHES = ["data.drop_last=false"]
FEWSHOT_STAGES = ("multitask", "maml", "hnet")
LATENT_STAGES = ("adaptation", "vae", "hyperclip", "hyperldm")
SHORT_CHAIN = CONF_DIR / "debug" / "short_chain.yaml"


def debug(*options: str) -> str:
    """One `debug=` override selecting every option given: Hydra merges a list of options of a group in order, where a
    second `debug=` override would replace the first (e.g. the short chain and the kill drill)."""
    return f"debug=[{','.join(options)}]"


def with_debug(args: list[str], *options: str) -> list[str]:
    """`args` with `options` added to the `debug=` choice they already make, if any (see `debug`)."""
    chosen = [o for a in args if a.startswith("debug=") for o in a.removeprefix("debug=").strip("[]").split(",") if o]
    return [*(a for a in args if not a.startswith("debug=")), debug(*chosen, *options)]


def short_chain(bench: str, tree: dict[str, Path] | None = None, *also: str) -> list[str]:
    """Every upstream stage of the latent stages short: `debug=short_chain` (conf/debug/short_chain.yaml holds the
    budgets), plus the `debug` options in `also`. The VQA fixture chain also needs the fixture's data in every stage
    and its tiny CLIP in features_vqa: added here to the config's budgets, which stay the source of truth."""
    choice = debug("short_chain", *also)
    if bench == "synthvqa":
        return [choice]
    assert tree is not None
    overrides = vqa_overrides(tree)
    paths, prompts, model = overrides[:2], overrides[2], overrides[3:5]
    budgets = OmegaConf.load(SHORT_CHAIN).upstream_overrides
    stages = [
        f"++upstream_overrides.{name}={_quoted([prompts, *budgets[name], *FIXTURE_BATCHES])}"
        for name in budgets
        if name.endswith("_vqa")
    ]
    return [
        choice,
        *paths,
        prompts,
        "data.num_workers=0",
        *FIXTURE_BATCHES,
        *stages,
        f"++upstream_overrides.features_vqa={_quoted([prompts, *model])}",
    ]


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
    data = (
        episodes
        if bench == "glyphs"
        else [
            f"paths.{bench}_dir={tree}",
            "data.train.holdout_per_class=2",
            "data.num_workers=0",
            "data.train.batch_size=4",
            *episodes,
        ]
    )
    grid = ["model.grid.n=2", "model.grid.steps=2"]
    tiny_unet = [
        *grid,
        *(
            []
            if bench == "glyphs"
            else [
                "model.unet.block_out_channels=[32,32,32,32]",
                "model.unet.norm_num_groups=8",
                "model.unet.layers_per_block=1",
            ]
        ),
    ]
    zoo = ["zoo.n_models=2", "zoo.classes_per_model=3"]  # 6 pseudo classes: enough for 5-way dfml episodes
    if experiment.startswith("classifier_"):
        return data
    if experiment.startswith("diffusion_unet_"):
        return [*data, *zoo, *tiny_unet]
    member = [*data, "trainer.max_steps=1", *tiny_unet]
    return [
        *data,
        *zoo,
        "model.check.n_per_model=2",
        "model.check.steps=2",
        "model.grid.n_per_model=2",
        f"+upstream_overrides.diffusion_unet_{bench}={_quoted(member)}",
        f"+upstream_overrides.classifier_{bench}={_quoted([*data, 'trainer.max_steps=1', 'test=false'])}",
    ]


def dfml_smoke_overrides(experiment: str, tree: Path) -> list[str]:
    """Smoke settings of dfml_* / diffusionmix_*: a 2x3 zoo of one-step members, a one-epoch dfml upstream."""
    bench = image_bench(experiment)
    twin = "_5shot" if experiment.endswith("_5shot") else ""
    zoo_run = image_smoke_overrides(f"diffusion_zoo_{bench}", tree)
    data = [o for o in zoo_run if o.startswith(("paths.", "data."))]
    nested = [o for o in zoo_run if o.startswith("+upstream_overrides.")]
    zoo_own = [o for o in zoo_run if o not in data and o not in nested and not o.startswith("zoo.")]
    zoo = [*data, *zoo_own, "zoo.n_models=2", "zoo.classes_per_model=3"]
    # 5-shot episodes need 5 + 6 images per class
    dfml = [
        *data,
        f"model.generation.per_class={11 if twin else 7}",
        "model.generation.batch_size=32",
        "model.generation.steps=2",
        "model.generation.every=1",
        "model.episodes.per_batch=2",
        "model.grid.per_class=2",
        "data.episodes.n_val_episodes=2",
    ]
    overrides = [*nested, f"+upstream_overrides.diffusion_zoo_{bench}={_quoted(zoo)}", *dfml]
    if experiment.startswith("dfml_"):
        return overrides
    dfml_upstream = [*dfml, "trainer.max_epochs=1", "data.train.steps_per_epoch=2", "test=false"]
    return [
        *nested,
        f"+upstream_overrides.diffusion_zoo_{bench}={_quoted(zoo)}",
        f"+upstream_overrides.dfml_{bench}{twin}={_quoted(dfml_upstream)}",
        *data,
        "model.mix.denoise_steps=2",
        "model.head.clean_steps=2",
        "model.head.mix_steps=2",
        "model.head.final_steps=2",
    ]


def smoke_overrides(experiment: str, tree: dict[str, Path], images: Path | None = None) -> list[str]:
    """A smoke run of `experiment`: fast_dev_run (`debug=fdr`) with fixture data (*_vqa, image sets) and short upstream
    stages (`debug=short_chain` for the few-shot and latent stages)."""
    if experiment.startswith(("dfml_", "diffusionmix_")):
        assert images is not None
        return [debug("fdr"), *dfml_smoke_overrides(experiment, images)]
    if experiment.startswith(("classifier_", "diffusion_")):
        assert images is not None
        return [debug("fdr"), *image_smoke_overrides(experiment, images)]
    stage, bench = experiment.split("_")[0], image_bench(experiment)
    if stage in LATENT_STAGES:
        return short_chain(bench, tree, "fdr")
    downstream = stage in FEWSHOT_STAGES
    if experiment.endswith("_vqa"):
        if not downstream:
            return [debug("fdr"), *vqa_overrides(tree)]
        overrides = vqa_overrides(tree)
        paths, model = overrides[:2], overrides[2:]
        return [debug("fdr"), *paths, *FIXTURE_BATCHES, f"upstream.features.overrides={_quoted(model)}"]
    return [debug("short_chain", "fdr") if downstream else debug("fdr")]


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
