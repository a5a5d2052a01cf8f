"""The stage contract: what `metadiff.run.train` calls on every stage's LightningModule, in one place.

A stage is a LightningModule that also publishes an artifact. Subclasses name the stage they run in the class
statement (`class VAEModule(Stage, name="vae")`, checked against the experiment's `stage:` before any work) and
implement `write_artifact`; the reader of that artifact (`load_<stage>(artifact)`) sits next to it in the same
module. Everything else has a default here, so a misspelt hook is an AttributeError, not a silently skipped step.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl


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

    def write_artifact(self, directory: Path) -> None:
        raise NotImplementedError
