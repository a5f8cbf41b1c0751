"""`sagan-prepare`: a dataset prepared once for training, as one zip of PNGs at the training resolution.

    sagan-prepare src=demo out=demo32.zip resolution=32                               # the demo images
    sagan-prepare src=path/to/imagenet/train out=imagenet128.zip resolution=128       # class folders (or a .zip)
    sagan-prepare src=cifar10-train out=cifar10_32.zip resolution=32 download=true    # a torchvision dataset

Every image goes through the training path (RGB, centre crop, bicubic resize): training on the zip
(`data=folder data.root=out.zip`) sees exactly the pixels that training on the source sees, and its loader decodes
small PNGs instead of full-size JPEGs. Labels (class folders, torchvision targets) go into a `dataset.json` in
StyleGAN2-ADA's layout, so the zip also trains in StyleGAN2-ADA, and its zips train here. Worker processes do the
decoding and encoding; an interrupted run, started again with the same arguments, continues where it stopped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from sagan.cli import parse_args, run_cli
from sagan.config import arg
from sagan.data.batch_stream import MAX_WORKERS, default_num_workers
from sagan.data.datasets import named_dataset
from sagan.data.preparation import Prepared, prepare
from sagan.utils.errors import UserError


@dataclass
class PrepareArgs:
    src: str = arg(MISSING, "a folder or .zip of images (class sub-folders are labels), demo, or <name>-<split> such as cifar10-train")
    out: str = arg(MISSING, "the zip to write (.zip)")
    resolution: int = arg(MISSING, "the training resolution the images are cropped and resized to")
    labels: bool = arg(True, "keep the classes in dataset.json (false: an unlabelled dataset)")
    workers: Optional[int] = arg(
        None, f"worker processes decoding and encoding images; default: one per CPU, at most {MAX_WORKERS} (as training's loader)"
    )
    skip_bad: bool = arg(False, "leave unreadable files out (named in the log) instead of stopping at the first")
    data_root: str = arg("data", "where torchvision datasets are (or are downloaded to)")
    download: bool = arg(False, "download a torchvision dataset that is not under data_root")


def prepare_dataset(args: Any) -> Prepared:
    """Check the arguments, build the source at the training resolution, write the zip; returns what was done."""
    out = Path(args.out).expanduser()
    if out.suffix != ".zip":
        raise UserError(f"out={args.out} must name a .zip file")
    if args.resolution < 4:
        raise UserError(f"resolution must be at least 4 pixels, got {args.resolution}")
    src = Path(args.src).expanduser().resolve()
    if src == out.resolve():
        raise UserError(f"out={args.out} is the source itself: write the prepared zip elsewhere")
    if src.is_dir() and out.resolve().is_relative_to(src):
        raise UserError(f"out={args.out} is inside the source folder {args.src}: write the prepared zip outside it")
    workers = default_num_workers() if args.workers is None else args.workers
    if workers < 0:
        raise UserError(f"workers must be >= 0 (0: the main process alone), got {workers}")
    dataset = named_dataset(
        args.src, resolution=args.resolution, data_root=args.data_root, download=args.download, labels=args.labels
    )
    job = {
        "source": args.src, "identity": repr(dataset.identity()), "resolution": args.resolution, "labels": args.labels,
        "images": len(dataset), "format": 1,
    }  # fmt: skip
    print(f"preparing {dataset.describe(args.src)} at {args.resolution} px with {workers} worker(s) -> {out}")
    prepared = prepare(dataset, out, job=job, workers=workers, skip_bad=args.skip_bad)
    left_out = f", {len(prepared.skipped)} unreadable left out" if prepared.skipped else ""
    print(f"{prepared.images} images{left_out} written to {out} ({out.stat().st_size / 2**20:.1f} MiB); "
          f"train on it with data=folder data.root={out}")  # fmt: skip
    return prepared


def main() -> None:
    run_cli(lambda: prepare_dataset(parse_args(PrepareArgs, sys.argv[1:], doc=__doc__)), log_to_stderr=True)


if __name__ == "__main__":
    main()
