"""Where the config tree lives, for code that composes configs outside `train.py` (tests, upstream builds)."""

from __future__ import annotations

import os
from pathlib import Path


def _find_conf_dir() -> Path:
    env = os.environ.get("METADIFF_CONF_DIR")
    if env:
        return Path(env)
    # editable install / source checkout: <repo>/src/metadiff/config/paths.py -> <repo>/conf
    return Path(__file__).resolve().parents[3] / "conf"


CONF_DIR = _find_conf_dir()
