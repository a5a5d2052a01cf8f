"""Known third-party console chatter, filtered at one place so that a run's log shows what it did.

Every run printed the same lines that no user can act on: open_clip's INFO trace of building a model (it logs on the
root logger), Lightning's advertising tips, its notice that our own ModelSummary replaces its default, and two
warnings about Lightning's own code. Each filter below matches one message (by category and pattern), with a comment
saying why it is harmless; everything else, above all a user's own warnings and every WARNING a library logs
under another message, still appears.

`quiet_third_party()` is called by `metadiff.run.train` (every run: `train.py`, upstream stages built in the same
process, jobs of a Hydra multirun, the forked runs of the tests) and by each stage rank that `trainer=ddp_sim`
spawns (a fresh interpreter inherits neither warning filters nor logging set-up). Calling it again changes nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings

# (category, message regex, module regex) of warnings that are harmless in this project.
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds torch's deprecated `LeafSpec`
    # and torch 2.14 warns on every fit. Lightning's code, not ours (nothing here uses LeafSpec): no user can act on it.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\."),
    # The predict-only stages (features, adaptation) write their outputs from `predict_step` themselves and return
    # None on purpose; the run calls `trainer.predict(return_predictions=False)`, so nothing is lost.
    (UserWarning, r"predict returned None if it was on purpose", r"lightning\.pytorch\."),
)

# logger name -> patterns (re.search) of its records below WARNING that are dropped.
CHATTY_INFO: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        r"Tip: .*\blitlogger\b",  # advertisement for Lightning's cloud logger, printed by every Trainer
        r"Tip: .*\blitmodels\b",  # ... for its cloud checkpoints, with Lightning's default ModelCheckpoint
        r"^Trainer already configured with model summary callbacks",  # conf/callbacks/default.yaml chose ours
        r"^Loading `train_dataloader` to estimate number of stepping batches",  # a stage's LR schedule asked
        r"^TPU available: False",  # no TPU, and none used (the GPU line stays: it says whether a GPU is used)
    ),
}

# Records of the root logger from these packages (open_clip logs with `logging.info(...)`, i.e. on the root logger,
# so it has no logger of its own to set to WARNING): below WARNING they are dropped; WARNINGs in `ROOT_HARMLESS`
# are dropped too, all other warnings stay.
QUIET_PACKAGES = ("open_clip",)
ROOT_HARMLESS = (
    # metadiff.features.clip_models.create_clip builds every CLIP with pretrained=None (no hub access, ever) and loads
    # the configured local checkpoint itself right after: open_clip's warning is printed before that and misleads.
    r"^No pretrained weights loaded for model '.*'\. Model initialized randomly\.$",
)


class DropMatching(logging.Filter):
    """Drop records below WARNING whose message matches one of `patterns`."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


class QuietPackagesOnRoot(logging.Filter):
    """Raise the root-logger records of `packages` to WARNING (drop their INFO/DEBUG), and drop the warnings that
    match `harmless`. Records of named loggers never reach a logger's own filters through propagation, so this
    sees only what is logged on the root logger itself."""

    def __init__(self, packages: tuple[str, ...], harmless: tuple[str, ...]):
        super().__init__()
        self.dirs = tuple(d for p in packages for d in _package_dirs(p))
        self.harmless = [re.compile(p) for p in harmless]

    def filter(self, record: logging.LogRecord) -> bool:
        if not (self.dirs and record.pathname.startswith(self.dirs)):
            return True
        if record.levelno < logging.WARNING:
            return False
        return record.levelno > logging.WARNING or not any(p.search(record.getMessage()) for p in self.harmless)


def _package_dirs(name: str) -> list[str]:
    """The folder of package `name` as its modules' code objects name it (and resolved, if a symlink differs)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = next(iter(spec.submodule_search_locations))
    return sorted({os.path.join(folder, ""), os.path.join(os.path.realpath(folder), "")})


def _install_once(logger: logging.Logger, filter_: logging.Filter) -> None:
    if not any(type(f) is type(filter_) for f in logger.filters):
        logger.addFilter(filter_)


def quiet_third_party() -> None:
    """Install the filters above in this process (idempotent)."""
    for category, message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in CHATTY_INFO.items():
        _install_once(logging.getLogger(name), DropMatching(patterns))
    _install_once(logging.getLogger(), QuietPackagesOnRoot(QUIET_PACKAGES, ROOT_HARMLESS))
