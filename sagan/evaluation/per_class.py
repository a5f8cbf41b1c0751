"""Intra-FID (Miyato & Koyama 2018; the SAGAN paper reports it for ImageNet): the FID of each class's samples
against that class's reference images, and their mean. Each class's reference statistics are computed from its own
images only (and cached as any reference), so memory is one class's features at a time."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Dataset

from sagan.data.datasets import ClassImages
from sagan.evaluation.inception import Inception
from sagan.evaluation.metrics import MetricsError, evaluate_generator
from sagan.evaluation.reference_stats import dataset_reference
from sagan.utils.processes import World


def check_intra(G: nn.Module | None, dataset: Dataset | None, ref: str) -> None:
    """Refuse, before any work, what intra-FID cannot be computed for."""
    if G is None:
        raise MetricsError("intra=true evaluates a checkpoint's generator class by class: give ckpt=, not gen=")
    if G.num_classes == 0:
        raise MetricsError("intra=true needs a class-conditional generator: this checkpoint's is unconditional")
    if ref.endswith(".npz"):
        raise MetricsError(
            f"intra=true needs each class's reference images, and '{ref}' is a statistics file of the whole set: give "
            "the images (class folders, a torchvision dataset, or ref=train of a conditional run)"
        )
    if dataset is None or dataset.num_classes == 0:
        raise MetricsError(
            f"intra=true needs reference images with labels (class folders, a torchvision dataset, ref=train of a "
            f"conditional run): '{ref}' has none"
        )
    if dataset.num_classes != G.num_classes:
        raise MetricsError(
            f"intra=true: the generator has {G.num_classes} classes, the reference '{ref}' {dataset.num_classes}"
        )


def intra_fid(
    G: nn.Module,
    dataset: Dataset,
    inception: Inception,
    *,
    n: int,
    seed: int,
    truncation: float | None,
    world: World,
    reference_limit: int | None,
    reference_args: dict[str, Any],
) -> dict[str, Any]:
    """{"intra_fid": mean over classes, "classes": {name: {"fid", "samples", "reference_images"}}}: class k's n // K
    samples (seed + k) against the images of class k of `dataset` (a seeded subset of reference_limit // K of them,
    when a limit is given)."""
    per_class = max(n // G.num_classes, 2)
    limit = None if reference_limit is None else max(reference_limit // G.num_classes, 2)
    classes = {}
    names = dataset.classes or [str(k) for k in range(G.num_classes)]
    for k in range(G.num_classes):
        images = ClassImages(dataset, k)
        if len(images) < 2:
            raise MetricsError(f"intra=true: class {names[k]} of the reference has {len(images)} image(s); FID needs 2")
        reference = dataset_reference(images, inception, description=f"class {names[k]}", limit=limit, **reference_args)
        metrics = evaluate_generator(
            G, reference, inception, n=per_class, seed=seed + k, choice=str(k), truncation=truncation,
            batch_size=reference_args["batch_size"], world=world, fid=True,
        )  # fmt: skip
        classes[names[k]] = {"fid": metrics["fid"], "samples": per_class, "reference_images": reference.num_images}
    return {"intra_fid": sum(c["fid"] for c in classes.values()) / len(classes), "classes": classes}


def class_table(rows: list[dict[str, Any]]) -> str:
    """Each class's FID (a column per truncation when there are several) and the mean, as a Markdown table."""
    heads = ["FID" if r["truncation"] is None else f"FID at t={r['truncation']:g}" for r in rows]
    lines = ["| class | " + " | ".join(heads) + " |", "|---|" + "---|" * len(rows)]
    for name in rows[0]["classes"]:
        lines.append(f"| {name} | " + " | ".join(f"{r['classes'][name]['fid']:.3f}" for r in rows) + " |")
    lines.append("| intra-FID (mean) | " + " | ".join(f"{r['metrics']['intra_fid']:.3f}" for r in rows) + " |")
    return "\n".join(lines)
