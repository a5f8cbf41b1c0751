"""What `sagan-fid` evaluates against what: a checkpoint's generator or a folder of images, against reference images
(a folder or zip, a torchvision dataset, the demo, the run's own training data) or a statistics file; the protocol
printed beside the numbers. Under torchrun every rank takes part (sagan.evaluation.metrics); rank 0 prints and writes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint, run_dir_of
from sagan.data.datasets import build_dataset, training_dataset
from sagan.data.folders import ImageFolder
from sagan.data.torchvision_sets import TORCHVISION_SPLITS
from sagan.utils.processes import SINGLE, World, main_rank_first, resolve_device
from sagan.evaluation.inception import Inception
from sagan.evaluation.metrics import (
    MetricsError,
    Protocol,
    check_request,
    evaluate_generator,
    inception_score_allowed,
    kid_subset,
    metrics_on_main,
    report,
)
from sagan.evaluation.reference_stats import (
    Reference,
    check_save_path,
    dataset_features,
    dataset_reference,
    default_cache_root,
    load_reference_file,
    save_reference_file,
)


def evaluate(args: Any, world: World = SINGLE, device: torch.device | None = None) -> dict[str, Any]:
    """Compute the metrics `args` (sagan.fid.FidArgs) ask for and/or write `save_ref`, print a table with the protocol,
    write metrics.json; returns what it wrote."""
    if args.ckpt is not None and args.gen is not None:
        raise MetricsError("give one of ckpt=<checkpoint> or gen=<folder or .zip of generated images>, not both")
    generating = args.ckpt is not None or args.gen is not None
    if not generating and args.save_ref is None:
        raise MetricsError("nothing to do: give ckpt=<checkpoint> or gen=<folder or .zip>, and/or save_ref=<file.npz>")
    if args.save_ref is not None:
        check_save_path(args.save_ref)
    device = device or resolve_device(args.device, world)
    weights = args.metrics.inception_weights
    isc = inception_score_allowed(args.isc and generating, weights)
    if generating and args.isc and not isc and not (args.fid or args.kid or args.prc):
        raise MetricsError(
            f"IS refused: the classifier in '{weights}' is all zeros (a copy of the FID network without it), so IS "
            "would always be 1.0; leave metrics.inception_weights unset (the full weights are downloaded) or ask for "
            "fid, kid or prc"
        )

    state, G, generated, source, resolution = None, None, None, None, args.resolution
    if args.ckpt is not None:
        state = load_checkpoint(args.ckpt)
        G, _ = networks_from_checkpoint(state, ema=args.ema, device=device)
        resolution = G.resolution
        source = f"{'G_ema' if args.ema else 'G'} of {args.ckpt} (step {state['trainer']['step']})"
    elif args.gen is not None:
        resolution, source = generated_resolution(args.gen), args.gen
        generated = build_dataset("folder", root=args.gen, resolution=resolution, labels=False)
    num_samples = args.n if generated is None else min(args.n, len(generated))

    with main_rank_first(world):  # downloads (a torchvision dataset, the Inception weights) happen once
        source_of_reference, resolution, notes, limit, subset_seed = reference_source(args, resolution, state)
        inception = Inception(weights=weights, device=device, logits=isc)
    if isinstance(source_of_reference, Reference):
        reference = source_of_reference
    else:
        reference = dataset_reference(
            source_of_reference, inception, description=args.ref, resolution=resolution, limit=limit, seed=subset_seed,
            weights=weights, cache_root=args.metrics.cache_dir or default_cache_root(), world=world,
            batch_size=args.metrics.batch_size, need_features=args.kid or args.prc,
        )  # fmt: skip
        if args.save_ref is not None and world.main:
            path = save_reference_file(args.save_ref, reference)
            print(f"statistics of {args.ref} ({reference.num_images} images at {resolution} px) written to {path}")
    if not generating:
        return {"saved": args.save_ref, "reference_cached": reference.cached}

    which = dict(fid=args.fid, isc=isc, kid=args.kid, prc=args.prc, kid_subset_size=args.metrics.kid_subset_size)
    check_request(n=num_samples, reference=reference, **which)
    batch_size = args.metrics.batch_size
    if G is not None:
        metrics = evaluate_generator(
            G, reference, inception, n=args.n, seed=args.seed, batch_size=batch_size, world=world, **which
        )
    else:
        pool, logits = dataset_features(
            generated, inception, limit=args.n, seed=args.seed, world=world, batch_size=batch_size, num_workers=0,
            what="generated images",
        )  # fmt: skip
        metrics = metrics_on_main(pool, logits, reference, world, seed=args.seed, **which)
    kid_size = kid_subset(num_samples, reference.num_images, args.metrics.kid_subset_size) if args.kid else None
    protocol = Protocol(
        num_samples=num_samples,
        reference=args.ref,
        reference_images=reference.num_images,
        resolution=resolution,
        weights=weights or Protocol.weights,
        kid_subset_size=kid_size,
        notes=notes,
    )
    result = {
        "metrics": metrics,
        "protocol": asdict(protocol),
        "generated": source,
        "isc_skipped": args.isc and not isc,
    }
    result["reference_cached"] = reference.cached
    if world.main:
        print(report(metrics, protocol))
        run_dir = run_dir_of(args.ckpt) if args.ckpt else Path.cwd()
        out = Path(args.out) if args.out else run_dir / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {out}")
    return result


def reference_source(
    args: Any, resolution: int | None, state: dict | None
) -> tuple[Dataset | Reference, int, list[str], int | None, int]:
    """What `ref` names: a statistics file (loaded), or reference images prepared at `resolution` (their own size when
    nothing is generated); the resolution, the protocol's notes, and the subset (size, seed) of the images.

    `ref=train` takes the run's own evaluation subset (eval.ref_images drawn with train.seed) unless ref_n is given,
    so that it evaluates exactly as training did.
    """
    if Path(args.ref).suffix == ".npz":
        if args.save_ref is not None:
            raise MetricsError(f"ref={args.ref} is a statistics file already: save_ref= saves the statistics of images")
        reference = load_reference_file(args.ref)
        made_at = reference.resolution
        notes = (
            [f"reference statistics made at {made_at} px"] if made_at and resolution and made_at != resolution else []
        )
        return reference, resolution or made_at or 0, notes, None, args.seed
    limit, subset_seed = args.ref_n, args.seed
    if args.ref == "train" and state is not None:
        config = state["config"]
        limit = args.ref_n if args.ref_n is not None else config["eval"]["ref_images"]
        subset_seed = config["train"]["seed"]
    common = dict(data_root=args.data_root, download=args.download, state=state)
    dataset = reference_dataset(args.ref, resolution=resolution or 32, **common)
    side = dataset.native_side()
    notes = [f"reference resized from {side} px"] if side is not None and resolution and side != resolution else []
    if resolution is None:  # statistics only, at the reference's own size
        resolution = side or 32
        dataset = reference_dataset(args.ref, resolution=resolution, **common)
    return dataset, resolution, notes, limit, subset_seed


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
