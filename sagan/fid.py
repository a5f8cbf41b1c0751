"""`sagan-fid`: FID / IS / KID / precision-recall the way papers report them, with the protocol beside every number.

    sagan-fid ckpt=outputs/.../checkpoints/last.pt ref=cifar10-train n=50000
    sagan-fid gen=path/to/generated ref=path/to/real [kid=true] [prc=true]
    sagan-fid ckpt=... ref=data/cifar10-train-jpg.zip metrics.inception_weights=/path/to/weights.pth isc=false

`ref` is a folder or .zip of images, a torchvision dataset as <name>-<split> (cifar10-train, cifar10-test,
cifar100-train, stl10-unlabeled, celeba-train, ...) under `data_root`, or `demo` (the generated demo images).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING
from torch.utils.data import Dataset

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.cli import parse_args, run_cli
from sagan.config import MetricsConfig
from sagan.data import TORCHVISION_SPLITS, ImageFolder, build_dataset
from sagan.dist import resolve_device
from sagan.metrics import (
    ImagesOnly,
    MetricsError,
    Protocol,
    cache_name,
    classifier_missing,
    compute_metrics,
    dataset_identity,
    default_cache_root,
)

log = logging.getLogger("sagan")


@dataclass
class FidArgs:
    ckpt: Optional[str] = None  # a checkpoint: its generator makes the images
    gen: Optional[str] = None  # or a folder / .zip of generated images
    ref: str = MISSING  # reference images: a folder / .zip, or <dataset>-<split>
    n: int = 50_000  # generated images (ckpt), or at most this many of `gen` (a seeded random subset)
    ref_n: Optional[int] = None  # reference images: a seeded random subset; default all
    fid: bool = True
    isc: bool = True
    kid: bool = False
    prc: bool = False
    ema: bool = True  # evaluate G_ema (false: the raw G)
    seed: int = 0
    data_root: str = "data"  # where torchvision datasets are (or are downloaded to)
    download: bool = True
    device: str = "auto"
    out: Optional[str] = None  # metrics.json; default beside the run (ckpt) or in the current directory
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def reference_dataset(ref: str, *, resolution: int, data_root: str, download: bool) -> tuple[Dataset, tuple]:
    """The reference images at `resolution`, and what identifies them for the statistics cache."""
    if ref == "demo":  # the generated demo images (experiment=demo trains on these, seed 0)
        return build_dataset("demo", root=None, resolution=resolution, labels=False), ("demo", resolution)
    path = Path(ref).expanduser()
    if path.exists():
        check_reference_size(path, resolution)
        return build_dataset("folder", root=str(path), resolution=resolution, labels=False), dataset_identity(str(path))
    name, _, split = ref.partition("-")
    if name not in TORCHVISION_SPLITS:
        known = ", ".join(f"{n}-{s}" for n, splits in TORCHVISION_SPLITS.items() for s in splits)
        raise MetricsError(f"reference '{ref}' is neither an existing folder/.zip nor a known dataset ({known}, demo)")
    dataset = build_dataset(name, root=data_root, resolution=resolution, download=download, labels=False, split=split or "train")
    return dataset, (name, split or "train", str(Path(data_root).expanduser().resolve()))


def check_reference_size(path: Path, resolution: int) -> None:
    """Refuse references smaller than the generated images: FID against upsampled references means little."""
    folder = ImageFolder(path, resolution=resolution, labels=False)
    width, height = folder.native_size(0)
    if min(width, height) < resolution:
        raise MetricsError(
            f"reference images in '{path}' are {width}x{height}, smaller than the {resolution}x{resolution} generated "
            f"images: compare against references of at least {resolution} px"
        )


def generated_resolution(gen: str) -> int:
    """The (square) size of the first generated image in a folder / zip."""
    folder = ImageFolder(Path(gen).expanduser(), resolution=1, labels=False)
    width, height = folder.native_size(0)
    if width != height:
        raise MetricsError(f"generated images must be square, the first in '{gen}' is {width}x{height}")
    return width


def evaluate(args: Any) -> dict[str, Any]:
    """Compute the asked metrics, print a table with the protocol, write metrics.json; returns what it wrote."""
    if (args.ckpt is None) == (args.gen is None):
        raise MetricsError("give exactly one of ckpt=<checkpoint> or gen=<folder or .zip of generated images>")
    device = resolve_device(args.device)
    weights = args.metrics.inception_weights
    isc, refused = args.isc, None
    if isc and classifier_missing(weights):
        refused = f"IS refused: the classifier in '{weights}' is all zeros, so IS would always be 1.0"
        print(f"warning: {refused}; computing the other metrics", file=sys.stderr)
        isc = False
        if not (args.fid or args.kid or args.prc):
            raise MetricsError(f"{refused}; use torch-fidelity's own weights (needs internet) or ask for fid/kid/prc")

    if args.ckpt is not None:
        state = load_checkpoint(args.ckpt)
        generated, _ = networks_from_checkpoint(state, ema=args.ema, device=device)
        resolution, num_samples = generated.resolution, args.n
        source = f"{'G_ema' if args.ema else 'G'} of {args.ckpt} (step {state['trainer']['step']})"
    else:
        resolution = generated_resolution(args.gen)
        generated = ImagesOnly(build_dataset("folder", root=args.gen, resolution=resolution, labels=False), limit=args.n, seed=args.seed)
        num_samples, source = len(generated), args.gen
    reference, identity = reference_dataset(args.ref, resolution=resolution, data_root=args.data_root, download=args.download)
    reference = ImagesOnly(reference, limit=args.ref_n, seed=args.seed)

    metrics = compute_metrics(
        generated,
        reference,
        num_samples=num_samples,
        reference_cache=cache_name(identity, resolution, args.ref_n, args.seed),
        fid=args.fid,
        isc=isc,
        kid=args.kid,
        prc=args.prc,
        weights=weights,
        cache_root=args.metrics.cache_dir or default_cache_root(),
        kid_subset_size=args.metrics.kid_subset_size,
        batch_size=args.metrics.batch_size,
        seed=args.seed,
        device=device,
    )
    protocol = Protocol(
        num_samples=num_samples,
        reference=args.ref,
        reference_images=len(reference),
        resolution=resolution,
        weights=weights or Protocol.weights,
    )
    result = {"metrics": metrics, "protocol": asdict(protocol), "generated": source, "is_refused": refused}
    print_table(metrics, protocol)
    out = Path(args.out) if args.out else (Path(args.ckpt).expanduser().resolve().parent.parent if args.ckpt else Path.cwd()) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return result


def print_table(metrics: dict[str, float], protocol: Protocol) -> None:
    rows = [("FID", "fid", None), ("IS", "is", "is_std"), ("KID", "kid", "kid_std"), ("precision", "precision", None), ("recall", "recall", None)]
    print(f"{'metric':<10} value")
    for label, key, std in rows:
        if key in metrics:
            print(f"{label:<10} {metrics[key]:.4f}" + (f" ± {metrics[std]:.4f}" if std else ""))
    print(f"protocol: {protocol.describe()}")


def main() -> None:
    run_cli(lambda: evaluate(parse_args(FidArgs, sys.argv[1:])))


if __name__ == "__main__":
    main()
