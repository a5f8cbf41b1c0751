from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

# A model and data small enough for a CPU step in well under a second: G width 16, D width 8, 64 demo images.
TINY = [
    "experiment=demo",
    "model.g_ch=4",
    "model.d_ch=4",
    "data.size=64",
    "train.batch_size=8",
    "logger.num_samples=4",
    "logger.attn_images=2",
    "logger.mode=disabled",
    "logger.log_every=1",
]


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module="sagan.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def tiny_cfg() -> Callable[..., DictConfig]:
    """Compose the tiny config plus extra overrides."""
    return lambda *overrides: compose_config(*TINY, *overrides)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The checkpoints (last.pt) of two tiny demo runs trained once per session, 2 steps each, for every test that
    only reads one: "cond" (class-conditional) and "uncond". Tests write their outputs elsewhere."""
    from sagan.training.loop import train

    runs = {}
    for name, extra in (("cond", ["model.conditional=true"]), ("uncond", [])):
        run = tmp_path_factory.mktemp(f"trained_{name}") / "run"
        train(compose_config(*TINY, "train.steps=2", "train.ckpt_every=2", *extra), run)
        runs[name] = run / "checkpoints" / "last.pt"
    return runs
