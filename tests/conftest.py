from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
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

# The offline FID Inception weights (tests of the real network's own numbers skip without them; a wrong path fails).
WEIGHTS = os.environ.get("SAGAN_FID_WEIGHTS")
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason="needs the offline FID Inception weights (SAGAN_FID_WEIGHTS)")


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module="sagan.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def tiny_cfg() -> Callable[..., DictConfig]:
    """Compose the tiny config plus extra overrides."""
    return lambda *overrides: compose_config(*TINY, *overrides)


# The settings of the `trained` fixture's runs, which a test that continues one of them composes again.
TRAINED = {"cond": [*TINY, "train.ckpt_every=2", "model.conditional=true"], "uncond": [*TINY, "train.ckpt_every=2"]}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The checkpoints (last.pt) of two tiny demo runs trained once per session, 2 steps each, for every test that
    only reads one: "cond" (class-conditional) and "uncond". Tests write their outputs elsewhere (`run_copy`)."""
    from sagan.training.loop import train

    runs = {}
    for name, overrides in TRAINED.items():
        run = tmp_path_factory.mktemp(f"trained_{name}") / "run"
        train(compose_config(*overrides, "train.steps=2"), run)
        runs[name] = run / "checkpoints" / "last.pt"
    return runs


def run_copy(ckpt: Path, folder: Path) -> Path:
    """`ckpt` copied to folder/run/checkpoints/last.pt, for a command that writes beside the checkpoint it reads."""
    copy = folder / "run" / "checkpoints" / "last.pt"
    copy.parent.mkdir(parents=True)
    shutil.copy(ckpt, copy)
    return copy


class PixelFeatures(torch.nn.Module):
    """A stand-in for the FID Inception network, for tests of what surrounds it (sampling, reference caches, protocols,
    tables, intra-FID, truncation curves): torch-fidelity's outputs, 2048 features (and 1008 logits), as a fixed
    smooth function of the image, in milliseconds instead of a second per image. Only the first 64 features vary (the
    rest are 0), which `symmetric_fid` turns into a 64-dimensional computation. The real network's own numbers are
    tested with the real weights (SAGAN_FID_WEIGHTS)."""

    ACTIVE = 64

    def __init__(self, layers: list[str]) -> None:
        super().__init__()
        self.layers = layers
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("project", torch.randn(3 * 8 * 8, self.ACTIVE + 1008, generator=generator) / 8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1)  # (B, 192)
        out = torch.tanh(pooled @ self.project)
        features = torch.nn.functional.pad(out[:, : self.ACTIVE], (0, 2048 - self.ACTIVE))
        return tuple(features if layer == "2048" else out[:, self.ACTIVE :] for layer in self.layers)


def symmetric_fid(stats_a: dict, stats_b: dict, verbose: bool = False) -> dict[str, float]:
    """torch-fidelity's `fid_statistics_to_metric` computed another way: tr sqrt(S_a S_b) as the trace of the square
    root of the symmetric sqrt(S_a) S_b sqrt(S_a), from two symmetric eigendecompositions, over the dimensions that
    vary in either set (a dimension with no variance in both has zero covariances: it adds only its mean difference).
    Milliseconds for the stand-in's features, seconds for 2048 varying ones, where scipy's general sqrtm takes half a
    minute on 2 cores. The same number up to rounding (tests/test_metrics.py checks it against torch-fidelity's)."""
    mu_a, mu_b = stats_a["mu"], stats_b["mu"]
    varies = (np.diag(stats_a["sigma"]) > 0) | (np.diag(stats_b["sigma"]) > 0)
    s_a, s_b = (s["sigma"][np.ix_(varies, varies)] for s in (stats_a, stats_b))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    fid = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)
    return {"frechet_inception_distance": fid}


@pytest.fixture
def stand_in_inception(monkeypatch) -> None:
    """Evaluation in this test runs on PixelFeatures instead of the Inception network (no weights needed), and FID's
    trace term through `symmetric_fid`: what surrounds the network is what such a test checks."""
    monkeypatch.setattr("sagan.evaluation.inception.create_feature_extractor", lambda name, layers, **kw: PixelFeatures(layers))
    monkeypatch.setattr("sagan.evaluation.metrics.fid_statistics_to_metric", symmetric_fid)


def run_command(name: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`sagan-<name> argv` run in this process, through the `main()` its console script calls (the process boundary
    is tested once, in tests/test_cli.py): its exit status, stdout and stderr. The logging set-up a command makes
    (Hydra's handlers on the root logger, bound to this test's captured streams) is undone afterwards."""
    module = {"import": "import_weights"}.get(name, name)
    monkeypatch.setattr(sys, "argv", [f"sagan-{name}", *argv])
    loggers = [logging.getLogger(), logging.getLogger("sagan")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    code = 0
    try:
        importlib.import_module(f"sagan.{module}").main()
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved):
            logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
    out = capsys.readouterr()
    return code, out.out, out.err
