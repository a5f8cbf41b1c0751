"""`sagan-train`: the Hydra command line of `sagan.training.loop.train` (`sagan-train --help`, `--cfg job`, overrides)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sagan.cli import run_cli
from sagan.utils.processes import world_from_env
from sagan.training.run_lock import acquire as acquire_run_dir
from sagan.training.loop import train


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
        return

    def start() -> None:
        # A run directory named on the command line is locked before Hydra writes its record (.hydra/) and log
        # there: a second trainer on a live run changes nothing in it. train() holds the same lock (and takes it
        # itself for the directories of sweeps).
        named = named_run_dir(overrides)
        if named is not None:
            acquire_run_dir(named)
        _hydra_main()

    run_cli(start, check_overrides=overrides)


def named_run_dir(overrides: list[str]) -> Path | None:
    """The run directory `hydra.run.dir=...` names for a single run with the lock on; None otherwise (Hydra flags
    such as a sweep's -m, an interpolated path, train.lock=false)."""
    if any(a.startswith("-") for a in overrides) or any(a.lower() == "train.lock=false" for a in overrides):
        return None
    value = next((a.split("=", 1)[1] for a in overrides if a.startswith("hydra.run.dir=")), None)
    return None if value is None or "${" in value else Path(value)


if __name__ == "__main__":
    main()
