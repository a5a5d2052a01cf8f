"""The stage contract: what `metadiff.run.train` calls on every stage's LightningModule, in one place.

A stage is a LightningModule that also publishes an artifact. Subclasses name the stage they run in the class
statement (`class VAEModule(Stage, name="vae")`, checked against the experiment's `stage:` before any work) and
implement `write_artifact`; the reader of that artifact (`load_<stage>(artifact)`) sits next to it in the same
module. Everything else has a default here, so a misspelt hook is an AttributeError, not a silently skipped step.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from omegaconf import DictConfig

# the checkpoint entries holding module weights: Lightning's, and the raw weights WeightAveraging (EMA) moves aside
WEIGHT_ENTRIES = ("state_dict", "current_model_state")


class Stage(pl.LightningModule):
    """Base of every stage's LightningModule.

    Hooks `metadiff.run.train` reads after fit/test/predict:
    - `summary_metrics`: values computed outside Lightning's logging (selection tables, paired differences), merged
      into the run's metrics and its artifact manifest;
    - `results_text`: the stage's results table (and plot path), printed as the last lines of the run;
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
        missing one fails in one line instead of after the chain before it trained."""
        return ()

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
