"""The stage contract: what `metadiff.run.train` calls on every stage's LightningModule, in one place.

A stage is a LightningModule that also publishes an artifact. Subclasses name the stage they run in the class
statement (`class VAEModule(Stage, name="vae")`, checked against the experiment's `stage:` before any work) and
implement `write_artifact`; the reader of that artifact (`load_<stage>(artifact)`) sits next to it in the same
module. Everything else has a default here, so a misspelt hook is an AttributeError, not a silently skipped step.

What a stage reads is declared here too: its upstream artifacts (`required_upstreams`, checked from the config before
any build, read with `upstream_artifact`) and its datamodule (`datamodule_view` with one of the `*Data` protocols
below, checked when read). What it reports goes through one channel: `summary_metrics` and `set_results_text`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from metadiff.config import ConfigError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from metadiff.data.adaptation import AdaptationData
    from metadiff.data.images.datamodule import EpisodesSpec, TrainSpec
    from metadiff.data.images.sources import ImageSource
    from metadiff.data.images.splits import ImageSplit
    from metadiff.data.meta_vqa.batches import TaskEpisodes
    from metadiff.data.meta_vqa.tasks import Task
    from metadiff.features.store import FeatureStore
    from metadiff.store import Artifact

# the checkpoint entries holding module weights: Lightning's, and the raw weights WeightAveraging (EMA) moves aside
WEIGHT_ENTRIES = ("state_dict", "current_model_state")


# ---------------------------------------------------------------------------------------- what a stage reads of its data
# A stage reads its datamodule (`data._target_`) through one of these views (`Stage.datamodule_view`): the attributes
# it names are the whole interface, checked when read, so a datamodule that lacks one fails in one line naming it
# instead of an AttributeError deep in a hook. Each lists only what the stages read, not the datamodule's API.


class ImageSetData(Protocol):
    """The data-free family's view (`metadiff.data.images.datamodule.FewShotImageDataModule`): classifier,
    diffusion_unet, diffusion_zoo, dfml, diffusionmix."""

    source: ImageSource
    shots: list[int]  # the shots of the test episodes, one test loader each
    train_cfg: TrainSpec
    episode_cfg: EpisodesSpec

    def split(self, name: str) -> ImageSplit: ...

    def train_classes(self) -> list[int]: ...


class MetaTaskData(Protocol):
    """The Meta-VQA tasks' view (`metadiff.data.meta_vqa.datamodule.MetaTaskDataModule`): the few-shot stages and
    adaptation. `store`, `tasks` and `embed_dim` exist once the datamodule's `setup` ran (before the stage's)."""

    store: FeatureStore
    tasks: dict[str, list[Task]]
    embed_dim: int
    n_shot_seed: int
    eval_tasks_per_batch: int

    def episodes(
        self,
        split: str,
        support_view: str = ...,
        query_view: str = ...,
        support_shots: int | None = None,
        n_shot_seed: int | None = None,
        limit: int | None = None,
    ) -> TaskEpisodes: ...

    def task_loader(
        self, episodes: TaskEpisodes, batch_size: int, shuffle: bool, split_ranks: bool = False
    ) -> DataLoader: ...


class LatentData(Protocol):
    """The latent stages' view (`metadiff.data.adaptation.AdaptationDataModule`): vae, hyperclip, hyperldm."""

    adaptation: AdaptationData  # the upstream adaptation dataset, loaded by the datamodule's `setup`


View = TypeVar("View")


def view_members(kind: type) -> list[str]:
    """The attribute and method names a `*Data` protocol declares (its own and its bases', not `Protocol`'s)."""
    names: list[str] = []
    for cls in kind.__mro__:
        if cls is object or cls is Protocol or cls.__module__ == "typing":
            continue
        names += list(vars(cls).get("__annotations__", {}))
        names += [n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)]
    return list(dict.fromkeys(names))


class Stage(pl.LightningModule):
    """Base of every stage's LightningModule.

    Hooks `metadiff.run.train` reads after fit/test/predict:
    - `summary_metrics`: values computed outside Lightning's logging (selection tables, paired differences), merged
      into the run's metrics and its artifact manifest;
    - `results_text`: the stage's results table (and plot path), printed as the last lines of the run; a stage sets
      it with `set_results_text` (rank 0 only), never prints it itself;
    - `artifact_ready`: False when the run made nothing to publish (e.g. a fast_dev_run feature store);
    - `stage_complete()`: True when the output is already complete and current, so predict is skipped;
    - `write_artifact(directory)`: write the stage's files into the (temporary) artifact directory.
    Class setting the run loop applies to the trainer:
    - `ddp_find_unused_parameters`: True when a step leaves parameters out of a backward pass.
    Checkpoint content:
    - `frozen_upstream_nets()`: attribute names of the nets loaded from upstream artifacts and never trained here.
      They are left out of the stage's checkpoints (their artifacts hold them: HyperLDM's frozen HNET would otherwise
      be written twice per checkpoint, raw and as its EMA copy) and put back from the loaded upstream on resume.
    """

    name: ClassVar[str]
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init_subclass__(cls, name: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            if cls.write_artifact is Stage.write_artifact:
                raise TypeError(f"stage class {cls.__name__} ('{name}') must implement write_artifact")

    def __init__(self) -> None:
        super().__init__()
        self.summary_metrics: dict[str, float] = {}
        self.results_text: str | None = None
        self.artifact_ready: bool = True

    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """The upstream artifacts this stage reads with the model config `model` (names in the experiment's
        `upstream:` block). `metadiff.run` checks them from the composed config, before any upstream is built, so a
        missing one fails in one line instead of after the chain before it trained. The one declaration: the
        constructor reads them with `upstream_artifact` and repeats no check of its own."""
        return ()

    @classmethod
    def check_config(cls, model: DictConfig) -> None:
        """Refuse, in one line naming the key, settings of `model` that no type rejects but that are wrong together
        (e.g. a guided row whose CFG reference is not in the grid). `metadiff.run` calls it with
        `required_upstreams`, before any upstream is built; the constructor may check the same again."""

    @classmethod
    def upstream_artifact(cls, upstream: Mapping[str, Artifact] | None, name: str) -> Artifact:
        """Upstream `name`, one that `required_upstreams` declares. In a run it is there (checked before any build);
        a module built by hand without it fails here in one line, not with a KeyError."""
        if upstream is None or name not in upstream:
            given = sorted(upstream or {})
            raise ConfigError(
                f"stage '{getattr(cls, 'name', cls.__name__)}' reads an upstream '{name}' "
                f"(required_upstreams) but was given {given or 'none'}"
            )
        return upstream[name]

    @classmethod
    def stage_names(cls) -> tuple[str, ...]:
        """Every `stage:` value this class can run (checked before any work, from the config alone)."""
        return (cls.name,)

    @property
    def stage_name(self) -> str:
        """The `stage:` value of the experiments that run this module (a class that serves several stages, like
        the few-shot learners, derives it from its configuration)."""
        return type(self).name

    def stage_complete(self) -> bool:
        return False

    def set_results_text(self, text: str) -> None:
        """Hand the stage's results table (and plot path) to `metadiff.run`, which prints it as the last lines of
        the run: the one channel a stage reports through (never `print`, whose lines would land amid the logs and
        once per rank). Kept on rank 0 only: under DDP every rank runs the stage, the table is printed once (a
        spawned rank's run hands rank 0's back to the launching process). Works before a trainer is attached
        (`stage_complete`), so the rank is Lightning's process-wide one."""
        rank_zero_only(self._keep_results_text)(text)

    def _keep_results_text(self, text: str) -> None:
        self.results_text = text

    def datamodule_view(self, kind: Callable[..., View]) -> View:
        """The trainer's datamodule as the typed view `kind` (`ImageSetData`, `MetaTaskData`, `LatentData`, or a
        stage's own protocol): every attribute `kind` declares is checked, and a missing one fails in one line
        naming it, the datamodule and the view. (`kind` is typed as the callable a class also is: mypy refuses a
        protocol class where `type[View]` is expected, its `type-abstract` check, python/mypy#4717.)"""
        view = cast(type, kind)
        datamodule = getattr(self.trainer, "datamodule", None)  # Lightning sets it when fit/test/predict starts
        if datamodule is None:
            raise ConfigError(f"stage '{self.stage_name}' reads its datamodule ({view.__name__}) but none is attached")
        missing = [name for name in view_members(view) if not hasattr(datamodule, name)]
        if missing:
            raise ConfigError(
                f"stage '{self.stage_name}' reads '{missing[0]}' of its datamodule ({view.__name__}), but "
                f"{type(datamodule).__module__}.{type(datamodule).__qualname__} (data._target_) has no "
                f"'{missing[0]}'" + (f" (nor {missing[1:]})" if missing[1:] else "")
            )
        return cast(View, datamodule)

    @property
    def fast_dev_run(self) -> bool:
        """True in a `fast_dev_run` smoke run (one batch per loader): a stage publishes no partial output then.
        Lightning sets the attribute on its trainer at construction, without declaring it."""
        return bool(getattr(self.trainer, "fast_dev_run", False))

    def precision_context(self) -> AbstractContextManager:
        """The trainer's precision (bf16 autocast under `bf16-mixed`, nothing under `32-true`) for work a stage does
        outside its `*_step` hooks, which are the only ones Lightning runs under it: sampling the zoo in an epoch
        hook (pseudo data, checks, sample grids) would otherwise run in fp32 on a bf16 trainer."""
        return self.trainer.precision_plugin.forward_context()

    def frozen_upstream_nets(self) -> tuple[str, ...]:
        """Attribute names of the nets this stage loaded from upstream artifacts and does not train (kept out of its
        checkpoints). A stage whose set depends on its config returns only those it holds."""
        return ()

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}." for name in self.frozen_upstream_nets())

    def _check_frozen_untrained(self) -> None:
        """A net declared frozen must not be trained: its updates would be lost from the checkpoint on resume."""
        frozen = {
            id(p): f"{net}.{key}"
            for net in self.frozen_upstream_nets()
            for key, p in getattr(self, net).named_parameters()
        }
        for optimizer in self.trainer.optimizers:  # called from the save hook: a trainer is attached
            for group in optimizer.param_groups:
                trained = [frozen[id(p)] for p in group["params"] if id(p) in frozen]
                if trained:
                    raise RuntimeError(
                        f"stage '{self.stage_name}': {trained[0]} is declared a frozen upstream net "
                        f"(frozen_upstream_nets) but an optimizer trains it"
                    )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen upstream nets' weights: subclasses that extend this hook call it (super())."""
        prefixes = self._frozen_prefixes()
        if not prefixes:
            return
        self._check_frozen_untrained()
        for entry in WEIGHT_ENTRIES:
            if entry in checkpoint:
                checkpoint[entry] = {k: v for k, v in checkpoint[entry].items() if not k.startswith(prefixes)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the frozen upstream nets' weights back from this module (loaded from their artifacts), so Lightning's
        strict load and the EMA's see a complete state; a checkpoint that still holds them keeps its own."""
        prefixes = self._frozen_prefixes()
        if not prefixes:
            return
        own = {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
        for entry in WEIGHT_ENTRIES:
            if entry in checkpoint:
                checkpoint[entry] = {**own, **checkpoint[entry]}

    def write_artifact(self, directory: Path) -> None:
        raise NotImplementedError
