"""FID, IS, KID and precision/recall of a generator or a set of images, from Inception features, through
torch-fidelity's own functions, with the protocol that every number depends on.

`evaluate_generator` is the one evaluation path of `sagan-fid ckpt=` and of evaluation during training: every rank
draws its part of the seeded samples (`sagan.evaluation.sampling`), runs the Inception network on it and the ranks exchange
features (2,048 floats per image), not images; rank 0 computes the metrics and shares them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from sagan.utils.processes import World, broadcast_object, gather_rows, rank_part
from sagan.evaluation.inception import INCEPTION, Inception
from sagan.evaluation.reference_stats import Reference, statistics
from sagan.evaluation.sampling import draw_batches
from sagan.utils.errors import UserError

log = logging.getLogger("sagan")

KID_SUBSET = 1000  # torch-fidelity's and the KID paper's subset size, when there are enough images


class MetricsError(UserError, ValueError):
    """Metrics that cannot be computed as asked: the message says why and what to change."""


@dataclass
class Protocol:
    """What a number depends on, printed beside it (papers differ on every one of these)."""

    num_samples: int
    reference: str
    reference_images: int | None
    resolution: int
    weights: str = "torch-fidelity download (pt_inception-2015-12-05)"
    feature_extractor: str = INCEPTION
    kid_subset_size: int | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        reference = f"{self.reference_images} reference images" if self.reference_images else "reference statistics"
        text = (
            f"{self.num_samples} generated vs {reference} ({self.reference}), {self.resolution} px resized to 299 by "
            f"the TF-compatible Inception ({self.feature_extractor}, weights: {self.weights})"
        )
        if self.kid_subset_size:
            text += f", KID over 100 subsets of {self.kid_subset_size}"
        return "; ".join([text, *self.notes])


def classifier_missing(weights: str | None) -> bool:
    """True if an Inception weights file has an all-zero classifier (like the offline pool3-only copy): its logits
    are all 0, so every Inception Score would be exactly 1.0."""
    if weights is None:
        return False
    state = torch.load(weights, map_location="cpu", weights_only=True)
    fc = state.get("fc.weight")
    return fc is None or not bool(fc.any())


def kid_subset(n_generated: int, n_reference: int | None, requested: int | None) -> int:
    """KID's subset size: `requested`, else 1,000 when both sets have at least 2,000 images, else half the smaller
    set (with subsets as large as a set, every subset is that whole set and KID's spread is 0 by construction)."""
    smaller = min(n_generated, n_reference or n_generated)
    size = requested or min(KID_SUBSET, smaller // 2)
    if size < 2 or size > smaller:
        raise MetricsError(
            f"KID needs subsets of at least 2 images and at most the smaller set ({smaller} images), got "
            f"kid_subset_size={size}: use more images or another metrics.kid_subset_size"
        )
    return size


def inception_score_allowed(asked: bool, weights: str | None) -> bool:
    """Whether IS can be computed with these Inception weights: not with an all-zero classifier (the offline
    pool3-only copy), where it would always be 1.0. Warns when IS was asked for and is skipped."""
    if asked and classifier_missing(weights):
        log.warning(
            f"IS skipped: the classifier in '{weights}' is all zeros, so IS would always be 1.0 (FID, KID, P/R are fine)"
        )
        return False
    return asked


def check_request(
    *, fid: bool, isc: bool, kid: bool, prc: bool, n: int, reference: Reference, kid_subset_size: int | None
) -> None:
    """Refuse, on every rank and before any image is generated, what cannot be computed: no metric, KID or
    precision/recall against a statistics file, a KID subset that does not fit the sets."""
    if not (fid or isc or kid or prc):
        raise MetricsError(
            "no metric asked for: set at least one of fid, isc, kid, prc (IS needs the Inception classifier)"
        )
    if (kid or prc) and reference.is_file:
        raise MetricsError(
            f"{'KID' if kid else 'precision/recall'} needs the reference images' features, and '{reference.description}' "
            "holds statistics only (mu, sigma): use ref=<folder, .zip or dataset> for kid=true / prc=true"
        )
    if kid:
        kid_subset(n, reference.num_images, kid_subset_size)
    if n < 2:
        raise MetricsError(f"need at least 2 generated images, got n={n}")


def compute_metrics(
    pool: torch.Tensor,
    logits: torch.Tensor | None,
    reference: Reference | None,
    *,
    fid: bool = True,
    isc: bool = False,
    kid: bool = False,
    prc: bool = False,
    kid_subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of generated images from their pool3 features (N, 2048) and logits (N, 1008, for IS) against a
    reference. Returns {"fid", "is", "is_std", "kid", "kid_std", "precision", "recall"}: what was asked."""
    if len(pool) < 2:
        raise MetricsError(f"need at least 2 generated images, got {len(pool)}")
    out: dict[str, float] = {}
    if fid:
        mu, sigma = statistics(pool)
        stats = {"mu": mu, "sigma": sigma}, {"mu": reference.mu, "sigma": reference.sigma}
        out["fid"] = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    if isc:
        score = isc_features_to_metric(logits, rng_seed=seed)
        out |= {"is": score["inception_score_mean"], "is_std": score["inception_score_std"]}
    if kid:
        size = kid_subset(len(pool), len(reference.features), kid_subset_size)
        score = kid_features_to_metric(
            pool, reference.features, kid_subsets=100, kid_subset_size=size, rng_seed=seed, verbose=False
        )
        out["kid"] = score["kernel_inception_distance_mean"]
        # With subsets as large as a set every subset is that set: a spread of 0 would say nothing.
        if size < min(len(pool), len(reference.features)):
            out["kid_std"] = score["kernel_inception_distance_std"]
    if prc:
        score = prc_features_to_metric(
            pool, reference.features, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False
        )
        out |= {"precision": score["precision"], "recall": score["recall"]}
    return {k: float(v) for k, v in out.items()}


def evaluate_generator(
    G: nn.Module,
    reference: Reference,
    inception: Inception,
    *,
    n: int,
    seed: int,
    batch_size: int,
    world: World,
    choice: str | None = None,
    truncation: float | None = None,
    abandon: Callable[[], bool] | None = None,
    **which: Any,
) -> dict[str, float]:
    """Metrics (`which`: fid, isc, kid, prc, kid_subset_size) of n seeded samples of G (as it is: call it in eval
    mode; `choice` and `truncation` as the sampler takes them) against `reference`, on every rank. `abandon`, asked
    between batches on every rank, gives up (Abandoned) when it says so (`Inception.features`).

    Rank r draws images `rank_part(n, r, world_size)` of the same n latents (`sagan.evaluation.sampling`), so the images, and the
    metrics, do not depend on the number of ranks.
    """
    part = rank_part(n, world.rank, world.size)
    batches = draw_batches(G, n, seed=seed, choice=choice, truncation=truncation, batch=batch_size, part=part)
    pool, logits = inception.features(
        batches, total=len(part), what="generated images", world=world, overall=n, abandon=abandon
    )
    return metrics_on_main(
        gather_rows(pool, world),
        None if logits is None else gather_rows(logits, world),
        reference,
        world,
        seed=seed,
        **which,
    )


def metrics_on_main(
    pool: torch.Tensor | None, logits: torch.Tensor | None, reference: Reference, world: World, **kwargs: Any
) -> dict[str, float]:
    """`compute_metrics` on rank 0 (which holds the gathered features), its result on every rank."""
    metrics = compute_metrics(pool, logits, reference, **kwargs) if world.main else None
    return broadcast_object(metrics, world)


def report(metrics: dict[str, float], protocol: Protocol) -> str:
    """The metrics as a small table and the protocol line. KID's "±" only where subsets are smaller than the sets."""
    rows = [
        ("FID", "fid", None),
        ("intra-FID", "intra_fid", None),
        ("IS", "is", "is_std"),
        ("KID", "kid", "kid_std"),
        ("precision", "precision", None),
        ("recall", "recall", None),
    ]
    lines = [f"{'metric':<10} value"]
    for label, key, std in rows:
        if key in metrics:
            spread = f" ± {metrics[std]:.4f}" if std and std in metrics else ""
            lines.append(f"{label:<10} {metrics[key]:.4f}{spread}")
    lines.append(f"protocol: {protocol.describe()}")
    return "\n".join(lines)
