"""`sagan-train`: the Hydra command line of `sagan.training.train` (`sagan-train --help`, `--cfg job`, overrides)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sagan.cli import run_cli
from sagan.dist import world_from_env
from sagan.training import train


@hydra.main(version_base="1.3", config_path="pkg://sagan.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(lambda: train(cfg, Path(HydraConfig.get().runtime.output_dir)))


def main() -> None:
    overrides = sys.argv[1:]
    if world_from_env().rank > 0:
        # Under torchrun, rank 0 owns the run directory (train() hands its path to the others): the other ranks
        # write no Hydra directory or log file of their own, and show only warnings and errors.
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    run_cli(_hydra_main, check_overrides=overrides)


if __name__ == "__main__":
    main()
