"""Entry point: `python train.py experiment=<name> [overrides]` (see README and conf/)."""

import logging
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from metadiff.errors import UserError
    from metadiff.run import optimized_metric, train

    try:
        return optimized_metric(cfg, train(cfg))
    except UserError as err:  # bad input: one clear line, no stack trace
        logging.getLogger("metadiff").error("%s", err)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
