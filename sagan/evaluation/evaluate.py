"""What `sagan-fid` evaluates against what: a checkpoint's generator or a folder of images, against reference images
(a folder or zip, a torchvision dataset, the demo, the run's own training data) or a statistics file; the protocol
printed beside the numbers. Under torchrun every rank takes part (sagan.evaluation.metrics); rank 0 prints and writes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sagan.checkpoint import load_checkpoint, networks_from_checkpoint, run_dir_of
from sagan.data.datasets import build_dataset
from sagan.utils.atomic_files import atomic_write
from sagan.utils.processes import SINGLE, World, main_rank_first, resolve_device
from sagan.evaluation.inception import Inception
from sagan.evaluation.curves import plot_truncation, truncation_table
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
from sagan.evaluation.per_class import check_intra, class_table, intra_fid
from sagan.evaluation.references import generated_resolution, reference_dataset, reference_source
from sagan.evaluation.reference_files import check_save_path, save_reference_file
from sagan.evaluation.reference_stats import Reference, dataset_features, dataset_reference, default_cache_root


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

    truncations = [None] if args.truncation is None else list(args.truncation)
    if (args.truncation is not None or args.intra) and G is None:
        raise MetricsError("truncation= and intra=true apply to a checkpoint's generator: give ckpt=, not gen=")
    with main_rank_first(world):  # downloads (a torchvision dataset, the Inception weights) happen once
        source_of_reference, resolution, notes, limit, subset_seed = reference_source(args, resolution, state)
        labelled = reference_dataset(
            args.ref, resolution=resolution, data_root=args.data_root, download=False, state=state, labels=True
        ) if args.intra and not isinstance(source_of_reference, Reference) else None  # fmt: skip
        if args.intra:  # before the Inception network loads (or downloads)
            check_intra(G, labelled, args.ref)
        inception = Inception(weights=weights, device=device, logits=isc)
    reference_args = dict(
        resolution=resolution, seed=subset_seed, weights=weights, cache_root=args.metrics.cache_dir or default_cache_root(),
        world=world, batch_size=args.metrics.batch_size,
    )  # fmt: skip
    if isinstance(source_of_reference, Reference):
        reference = source_of_reference
    else:
        reference = dataset_reference(
            source_of_reference, inception, description=args.ref, limit=limit, need_features=args.kid or args.prc,
            **reference_args,
        )  # fmt: skip
        if args.save_ref is not None and world.main:
            path = save_reference_file(args.save_ref, reference)
            print(f"statistics of {args.ref} ({reference.num_images} images at {resolution} px) written to {path}")
    if not generating:
        return {"saved": args.save_ref, "reference_cached": reference.cached}

    which = dict(fid=args.fid, isc=isc, kid=args.kid, prc=args.prc, kid_subset_size=args.metrics.kid_subset_size)
    check_request(n=num_samples, reference=reference, **which)
    batch_size = args.metrics.batch_size
    rows = []
    for truncation in truncations:
        if G is not None:
            metrics = evaluate_generator(
                G, reference, inception, n=args.n, seed=args.seed, batch_size=batch_size, world=world,
                truncation=truncation, **which,
            )  # fmt: skip
        else:
            pool, logits = dataset_features(
                generated, inception, limit=args.n, seed=args.seed, world=world, batch_size=batch_size, num_workers=0,
                what="generated images",
            )  # fmt: skip
            metrics = metrics_on_main(pool, logits, reference, world, seed=args.seed, **which)
        per_class = {}
        if args.intra:
            per_class = intra_fid(
                G, labelled, inception, n=args.n, seed=args.seed, truncation=truncation, world=world,
                reference_limit=limit, reference_args=reference_args,
            )  # fmt: skip
            metrics["intra_fid"] = per_class["intra_fid"]
        rows.append({"truncation": truncation, "metrics": metrics, **({"classes": per_class["classes"]} if per_class else {})})
    kid_size = kid_subset(num_samples, reference.num_images, args.metrics.kid_subset_size) if args.kid else None
    if len(truncations) == 1 and truncations[0] is not None:
        notes = [*notes, f"z truncated to [-{truncations[0]:g}, {truncations[0]:g}]"]
    if args.intra:
        per_class = f"{limit // G.num_classes} of " if limit else ""
        notes = [*notes, f"intra-FID: {max(args.n // G.num_classes, 2)} samples per class against {per_class}that class's images"]
    protocol = Protocol(
        num_samples=num_samples, reference=args.ref, reference_images=reference.num_images, resolution=resolution,
        weights=weights or Protocol.weights, kid_subset_size=kid_size, notes=notes,
    )  # fmt: skip
    result = {"metrics": rows[0]["metrics"], "protocol": asdict(protocol), "generated": source, "isc_skipped": args.isc and not isc}
    if "classes" in rows[0]:
        result["classes"] = rows[0]["classes"]
    if len(rows) > 1:  # the curve: every row has its metrics (and classes)
        result["truncation"] = rows
        del result["metrics"]
        result.pop("classes", None)
    result["reference_cached"] = reference.cached
    if world.main:
        run_dir = run_dir_of(args.ckpt) if args.ckpt else Path.cwd()
        out = Path(args.out) if args.out else run_dir / "metrics.json"
        if len(rows) > 1:
            print(truncation_table(rows))
            print(f"protocol: {protocol.describe()}")
            print(plot_truncation(rows, out.with_name("truncation.png"), title=f"{source}: {protocol.describe()}"))
        else:
            print(report(rows[0]["metrics"], protocol))
        if args.intra:
            print(class_table(rows))
        atomic_write(out, json.dumps(result, indent=2) + "\n")
        print(f"written to {out}")
    return result
