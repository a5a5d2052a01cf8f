"""What `make gpu-check` reads: its own sizes (conf/gpu_check.yaml, typed like a stage's blocks) and the experiments
it measures, composed with Hydra as `train.py` would compose them, so every model size and budget comes from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from metadiff.config import ConfigError
from metadiff.config.paths import CONF_DIR
from metadiff.config.typed import as_spec

CONFIG_NAME = "gpu_check"


@dataclass(frozen=True)
class ClipSize:
    images: int
    texts: int
    warmup_batches: int


@dataclass(frozen=True)
class FeaturesSize:
    worker_counts: list[int]
    batch_size: int | None


@dataclass(frozen=True)
class VQASize:
    images: int
    image_size: list[int]
    questions: int
    images_per_question: int
    answers_per_question: int
    min_task_examples: int | None


@dataclass(frozen=True)
class HNetSize:
    tasks: int | None
    inner_steps: int | None
    repeats: int


@dataclass(frozen=True)
class ChainSize:
    """Overrides of each chain stage (token budgets): lists of Hydra override strings."""

    hnet_vqa: list[str]
    multitask_vqa: list[str]
    adaptation_vqa: list[str]
    hyperldm_vqa: list[str]


@dataclass(frozen=True)
class UNetSize:
    batch_size: int | None
    holdout_per_class: int | None
    warmup_steps: int
    steps: int


@dataclass(frozen=True)
class GuidedSize:
    members: int | None
    batch_size: int | None
    steps: int | None


@dataclass(frozen=True)
class MixSize:
    batch_size: int | None
    denoise_steps: int | None


@dataclass(frozen=True)
class NCCLSize:
    members: int
    per_class: int
    steps: int


@dataclass(frozen=True)
class Sizes:
    """`sizes.full` / `sizes.quick`: how much each section runs (null: the experiment's own value)."""

    clip: ClipSize
    features: FeaturesSize
    vqa: VQASize
    hnet: HNetSize
    chain: ChainSize
    unet: UNetSize
    guided: GuidedSize
    mix: MixSize
    nccl: NCCLSize


@dataclass(frozen=True)
class MetaVQAStats:
    meta_train_tasks: int
    meta_test_tasks: int
    images: int
    answer_prompts: int


@dataclass(frozen=True)
class MiniImageNetStats:
    train_classes: int
    images_per_class: int


@dataclass(frozen=True)
class Datasets:
    meta_vqa: MetaVQAStats
    miniimagenet: MiniImageNetStats


@dataclass(frozen=True)
class Experiments:
    features: str
    hnet: str
    multitask: str
    adaptation: str
    hyperldm: str
    unet: str
    zoo: str
    judge: str
    dfml: str
    diffusionmix: str


@dataclass(frozen=True)
class Trainers:
    cuda: str
    cpu: str


@dataclass(frozen=True)
class GpuCheckSpec:
    experiments: Experiments
    trainer: Trainers
    sizes: dict
    datasets: Datasets


@dataclass(frozen=True)
class Settings:
    """One run of the check: its sizes, where it writes, on which device, under which trainer group."""

    spec: GpuCheckSpec
    sizes: Sizes
    mode: str  # "full" | "quick"
    device: str  # "cuda" | "cpu"
    work: Path  # generated data, artifacts and checkpoints (a temporary folder)

    @property
    def trainer(self) -> str:
        return getattr(self.spec.trainer, self.device)


def load_settings(quick: bool, device: str, work: Path) -> Settings:
    """conf/gpu_check.yaml, checked, with the sizes of the mode asked for."""
    raw = cast(DictConfig, OmegaConf.load(CONF_DIR / f"{CONFIG_NAME}.yaml"))  # the file is a mapping
    spec = as_spec(GpuCheckSpec, raw, CONFIG_NAME)
    mode = "quick" if quick else "full"
    if mode not in spec.sizes:
        raise ConfigError(f"{CONFIG_NAME}.sizes has no '{mode}' block (keys: {sorted(spec.sizes)})")
    sizes = as_spec(Sizes, spec.sizes[mode], f"{CONFIG_NAME}.sizes.{mode}")
    return Settings(spec=spec, sizes=sizes, mode=mode, device=device, work=work)


def compose_experiment(
    experiment: str, overrides: list[str] | tuple[str, ...] = (), hydra_config: bool = False
) -> DictConfig:
    """The experiment's full config as `train.py` composes it (`hydra_config`: with Hydra's own node, registered as
    the current HydraConfig, which the pipeline needs to hand the trainer group on to upstreams)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=hydra_config
        )
        if hydra_config:
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):  # a Hydra app's job config has no `hydra` node (the run loop resolves the rest)
                del cfg["hydra"]
    if not hydra_config:
        GlobalHydra.instance().clear()
    return cfg


def or_config(value: int | None, configured: int) -> int:
    """A size of the check, or the experiment's own value where the check leaves it null."""
    return int(configured) if value is None else int(value)
