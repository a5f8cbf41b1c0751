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

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING
from torch.utils.data import Dataset

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint
from sagan.cli import parse_args, run_cli
from sagan.config import MetricsConfig, arg
from sagan.datasets import TORCHVISION_SPLITS, ImageFolder, build_dataset, native_side, training_dataset
from sagan.dist import SINGLE, World, broadcast_object, init_distributed, leave_distributed, resolve_device
from sagan.inception import Inception
from sagan.metrics import (
    MetricsError,
    Protocol,
    check_request,
    classifier_missing,
    compute_metrics,
    evaluate_generator,
    kid_subset,
    report,
)
from sagan.reference_stats import (
    Reference,
    dataset_features,
    dataset_reference,
    default_cache_root,
    load_reference_file,
    save_reference_file,
)


@dataclass
class FidArgs:
    ckpt: Optional[str] = arg(None, "a checkpoint: its generator makes the images")
    gen: Optional[str] = arg(None, "or a folder / .zip of generated images")
    ref: str = arg(MISSING, "reference: folder / .zip, <dataset>-<split>, demo, train (the run's data) or a .npz")
    n: int = arg(50_000, "generated images (ckpt), or at most this many of gen (a seeded random subset)")
    ref_n: Optional[int] = arg(None, "reference images: a seeded random subset; default all")
    fid: bool = arg(True, "Frechet Inception Distance")
    isc: bool = arg(True, "Inception Score (needs the Inception classifier)")
    kid: bool = arg(False, "Kernel Inception Distance (needs reference images, not a .npz)")
    prc: bool = arg(False, "precision and recall (needs reference images, not a .npz)")
    ema: bool = arg(True, "evaluate G_ema (false: the raw G)")
    seed: int = arg(0, "seed of the samples (and of the subsets)")
    resolution: Optional[int] = arg(None, "size to prepare reference images at for save_ref alone; default theirs")
    save_ref: Optional[str] = arg(None, "also write the reference's statistics to this .npz (mu, sigma, num_images)")
    data_root: str = arg("data", "where torchvision datasets are (or are downloaded to)")
    download: bool = arg(True, "download torchvision datasets on first use")
    device: str = arg("auto", "auto (GPU when there is one), cpu, cuda, cuda:N")
    out: Optional[str] = arg(None, "metrics.json; default beside the run (ckpt) or in the current directory")
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def reference_dataset(ref: str, *, resolution: int, data_root: str, download: bool, state: dict | None) -> Dataset:
    """The reference images of `ref` (not a statistics file), prepared at `resolution` as training images are."""
    if ref == "train":
        if state is None:
            raise MetricsError("ref=train means the data a checkpoint trained on: give ckpt=<checkpoint>")
        return training_dataset(state["config"], resolution=resolution, labels=False)
    if ref == "demo":  # the generated demo images (experiment=demo trains on these, seed 0)
        return build_dataset("demo", root=None, resolution=resolution, labels=False)
    path = Path(ref).expanduser()
    if path.exists():
        return build_dataset("folder", root=str(path), resolution=resolution, labels=False)
    name, _, split = ref.partition("-")
    if name not in TORCHVISION_SPLITS:
        known = ", ".join(f"{n}-{s}" for n, splits in TORCHVISION_SPLITS.items() for s in splits)
        raise MetricsError(
            f"reference '{ref}' is neither an existing folder/.zip/.npz nor a known dataset ({known}, demo, train)"
        )
    return build_dataset(
        name, root=data_root, resolution=resolution, download=download, labels=False, split=split or "train"
    )


def generated_resolution(gen: str) -> int:
    """The (square) size of the first generated image in a folder / zip."""
    folder = ImageFolder(Path(gen).expanduser(), resolution=1, labels=False)
    width, height = folder.native_size(0)
    if width != height:
        raise MetricsError(f"generated images must be square, the first in '{gen}' is {width}x{height}")
    return width


def inception_score_allowed(asked: bool, weights: str | None, other_metrics: bool) -> tuple[bool, str | None]:
    """Whether IS can be computed with these Inception weights; if not, the warning (or an error when IS was the only
    metric asked for)."""
    if not (asked and classifier_missing(weights)):
        return asked, None
    refused = f"IS refused: the classifier in '{weights}' is all zeros, so IS would always be 1.0"
    if not other_metrics:
        raise MetricsError(f"{refused}; use torch-fidelity's own weights (needs internet) or ask for fid/kid/prc")
    print(f"warning: {refused}; computing the other metrics", file=sys.stderr)
    return False, refused


def evaluate(args: Any, world: World = SINGLE, device: torch.device | None = None) -> dict[str, Any]:
    """Compute the asked metrics (and/or write `save_ref`), print a table with the protocol, write metrics.json;
    returns what it wrote. Under torchrun every rank takes part; rank 0 prints and writes."""
    if args.ckpt is not None and args.gen is not None:
        raise MetricsError("give one of ckpt=<checkpoint> or gen=<folder or .zip of generated images>, not both")
    generating = args.ckpt is not None or args.gen is not None
    if not generating and args.save_ref is None:
        raise MetricsError("nothing to do: give ckpt=<checkpoint> or gen=<folder or .zip>, and/or save_ref=<file.npz>")
    device = device or resolve_device(args.device, world)
    weights = args.metrics.inception_weights
    isc, refused = inception_score_allowed(args.isc and generating, weights, args.fid or args.kid or args.prc)

    state, G, source, resolution = None, None, None, args.resolution
    if args.ckpt is not None:
        state = load_checkpoint(args.ckpt)
        G, _ = networks_from_checkpoint(state, ema=args.ema, device=device)
        resolution, source = (
            G.resolution,
            f"{'G_ema' if args.ema else 'G'} of {args.ckpt} (step {state['trainer']['step']})",
        )
    elif args.gen is not None:
        resolution, source = generated_resolution(args.gen), args.gen
    reference, resolution, notes = reference_source(args, resolution, state)
    check_request(
        fid=args.fid,
        isc=isc,
        kid=args.kid,
        prc=args.prc,
        weights=weights,
        reference=reference if isinstance(reference, Reference) else None,
    )
    inception = Inception(weights=weights, device=device, logits=isc)
    if not isinstance(reference, Reference):  # images: their statistics, from the cache or computed now
        reference = dataset_reference(
            reference, inception, description=args.ref, resolution=resolution, limit=args.ref_n, seed=args.seed,
            cache_root=args.metrics.cache_dir or default_cache_root(), world=world, batch_size=args.metrics.batch_size,
            need_features=args.kid or args.prc,
        )  # fmt: skip
        if args.save_ref is not None and world.main:
            path = save_reference_file(args.save_ref, reference)
            print(f"statistics of {args.ref} ({reference.num_images} images at {resolution} px) written to {path}")
    if not generating:
        return {"saved": args.save_ref, "reference_cached": reference.cached}

    which = dict(fid=args.fid, isc=isc, kid=args.kid, prc=args.prc, kid_subset_size=args.metrics.kid_subset_size)
    if G is not None:
        num_samples = args.n
        metrics = evaluate_generator(
            G, reference, inception, n=args.n, seed=args.seed, batch_size=args.metrics.batch_size, world=world, **which
        )
    else:
        generated = build_dataset("folder", root=args.gen, resolution=resolution, labels=False)
        pool, logits = dataset_features(
            generated, inception, limit=args.n, seed=args.seed, world=world, batch_size=args.metrics.batch_size,
            num_workers=0, what="generated images",
        )  # fmt: skip
        num_samples = len(pool)
        metrics = broadcast_object(
            compute_metrics(pool, logits, reference, seed=args.seed, **which) if world.main else None, world
        )
    protocol = Protocol(
        num_samples=num_samples,
        reference=args.ref,
        reference_images=reference.num_images,
        resolution=resolution,
        weights=weights or Protocol.weights,
        kid_subset_size=kid_subset(num_samples, reference.num_images, args.metrics.kid_subset_size)
        if args.kid
        else None,
        notes=notes,
    )
    result = {"metrics": metrics, "protocol": asdict(protocol), "generated": source, "is_refused": refused}
    result["reference_cached"] = reference.cached
    if world.main:
        print(report(metrics, protocol))
        run_dir = Path(args.ckpt).expanduser().resolve().parent.parent if args.ckpt else Path.cwd()
        out = Path(args.out) if args.out else run_dir / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {out}")
    return result


def reference_source(
    args: Any, resolution: int | None, state: dict | None
) -> tuple[Dataset | Reference, int, list[str]]:
    """What `ref` names: a statistics file (loaded), or reference images prepared at `resolution` (their own size when
    nothing is generated); and the resolution and the protocol notes that follow."""
    if Path(args.ref).suffix == ".npz":
        if args.save_ref is not None:
            raise MetricsError(f"ref={args.ref} is a statistics file already: save_ref= saves the statistics of images")
        return load_reference_file(args.ref), resolution or 0, []
    common = dict(data_root=args.data_root, download=args.download, state=state)
    dataset = reference_dataset(args.ref, resolution=resolution or 32, **common)
    side = native_side(dataset)
    if resolution is None:  # statistics only, at the reference's own size
        resolution = side or 32
        return reference_dataset(args.ref, resolution=resolution, **common), resolution, []
    return dataset, resolution, [f"reference resized from {side} px"] if side is not None and side != resolution else []


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
