"""`sagan-fid`: FID / IS / KID / precision-recall the way papers report them, with the protocol beside every number.

    sagan-fid ckpt=outputs/run/checkpoints/last.pt ref=cifar10-train n=50000      # G_ema vs the training set
    sagan-fid ckpt=outputs/run/checkpoints/last.pt ref=train n=10000 kid=true    # vs the data the run trained on
    sagan-fid gen=path/to/generated ref=path/to/real.zip isc=false                # two folders / zips of images
    sagan-fid ref=cifar10-train save_ref=cifar10_train.npz                        # write reference statistics
    sagan-fid ckpt=outputs/run/checkpoints/last.pt ref=cifar10_train.npz          # FID against a statistics file

`ref` is a folder or .zip of images, a torchvision dataset as <name>-<split> (cifar10-train, cifar10-test,
cifar100-train, stl10-unlabeled, celeba-train, ...) under `data_root`, `demo` (the generated demo images), `train`
(the data the checkpoint trained on, as in-training evaluation uses it) or a .npz statistics file (`mu`, `sigma`).
Reference images are centre-cropped and resized to the generator's resolution, as training images are.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from sagan.cli import parse_args, run_cli
from sagan.config import MetricsConfig, arg
from sagan.dist import init_distributed, leave_distributed
from sagan.evaluation import evaluate


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
    seed: int = arg(0, "seed of the samples (and of the subsets)")
    resolution: Optional[int] = arg(None, "size to prepare reference images at for save_ref alone; default theirs")
    save_ref: Optional[str] = arg(None, "also write the reference's statistics to this .npz (mu, sigma, count, size)")
    data_root: str = arg("data", "where torchvision datasets are (or are downloaded to)")
    download: bool = arg(True, "download torchvision datasets on first use")
    device: str = arg("auto", "auto (GPU when there is one), cpu, cuda, cuda:N")
    out: Optional[str] = arg(None, "metrics.json; default beside the run (ckpt) or in the current directory")
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def main() -> None:
    def run() -> None:
        args = parse_args(FidArgs, sys.argv[1:], doc=__doc__)
        world, device = init_distributed(args.device, timeout_min=60)  # one process, or every rank torchrun started
        try:
            evaluate(args, world, device)
        finally:
            leave_distributed(world)

    run_cli(run, log_to_stderr=True)


if __name__ == "__main__":
    main()
