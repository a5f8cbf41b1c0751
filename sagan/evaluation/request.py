"""What `sagan-fid` is asked (its key=value arguments, also what `sagan-ablate` asks of every run it evaluates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from sagan.config import MetricsConfig, arg


@dataclass
class FidArgs:
    ckpt: Optional[str] = arg(None, "a checkpoint: its generator makes the images")
    gen: Optional[str] = arg(None, "or a folder / .zip of generated images")
    ref: str = arg(MISSING, "reference: folder / .zip, <dataset>-<split>, demo, train (the run's data) or a .npz")
    n: int = arg(50_000, "generated images (ckpt), or at most this many of gen (a seeded random subset)")
    ref_n: Optional[int] = arg(None, "reference images: a seeded random subset; default all (ref=train: as training)")
    fid: bool = arg(True, "Frechet Inception Distance")
    isc: bool = arg(True, "Inception Score (needs the Inception classifier)")
    kid: bool = arg(False, "Kernel Inception Distance (needs reference images, not a .npz)")
    prc: bool = arg(False, "precision and recall (needs reference images, not a .npz)")
    ema: bool = arg(True, "evaluate G_ema (false: the raw G)")
    truncation: Optional[list[float]] = arg(None, "z truncated to [-t, t]: one value, or a list for the trade-off curve (a table and truncation.png)")
    intra: bool = arg(False, "intra-FID: each class's samples (n / classes) against that class's reference images, and their mean")
    seed: int = arg(0, "seed of the samples (and of the subsets)")
    resolution: Optional[int] = arg(None, "size to prepare reference images at for save_ref alone; default theirs")
    save_ref: Optional[str] = arg(None, "also write the reference's statistics to this .npz (mu, sigma, count, size)")
    data_root: str = arg("data", "where torchvision datasets are (or are downloaded to)")
    download: bool = arg(True, "download torchvision datasets on first use")
    device: str = arg("auto", "auto (GPU when there is one), cpu, cuda, cuda:N")
    out: Optional[str] = arg(None, "metrics.json; default beside the run (ckpt) or in the current directory")
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
