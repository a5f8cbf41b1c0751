"""What generated images are compared with: Inception statistics of reference images, cached once per set of images.
Statistics files (`.npz`) are read and written by sagan.evaluation.reference_files, with `write_statistics`, the one
writer of both (whole or not at all; a full disk as one line).

One cache, keyed one way: by what the images are (their dataset's `identity()`), the resolution they are prepared at, the
subset, and the Inception weights. Training (`eval.every`) and `sagan-fid` therefore share statistics of the same data.
Under torchrun every rank sums the moments of its part of the images' features as they come (memory independent of the
number of images), the ranks reduce them once, and rank 0 alone holds the statistics.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.metric_fid import fid_features_to_statistics

from sagan.utils.atomic_files import DiskFull, atomic_file, space_for
from sagan.data.dataset_base import reraise_worker_error
from sagan.data.datasets import ImageSubset
from sagan.utils.processes import World, barrier, broadcast_object, gather_rows, rank_part
from sagan.evaluation.inception import Abandoned, Inception
from sagan.evaluation.moments import FeatureMoments
from sagan.utils.errors import UserError

log = logging.getLogger("sagan")

FEATURES = 2048


class ReferenceStatsError(UserError, ValueError):
    """Reference statistics that cannot be used as asked; the message says why and what to change."""


@dataclass
class Reference:
    """Statistics of reference images: mean and covariance of their Inception pool3 features (float64), and the
    features themselves when they were asked for (KID and precision/recall need them; a statistics file has none).

    On ranks other than 0, `mu`, `sigma` and `features` are None: only rank 0 computes metrics.
    """

    description: str  # what the protocol line names: "cifar10-train", a folder, a .npz file
    mu: np.ndarray | None
    sigma: np.ndarray | None
    num_images: int | None  # None: a statistics file that does not say
    features: torch.Tensor | None = None
    resolution: int | None = None  # the size the images were prepared at, when known
    cached: bool = False  # read from the cache, not computed now
    is_file: bool = False  # a statistics file: no features, ever


def default_cache_root() -> str:
    """Where reference statistics are cached: $SAGAN_CACHE, else ~/.cache/sagan/reference_stats."""
    return os.environ.get("SAGAN_CACHE", str(Path.home() / ".cache" / "sagan" / "reference_stats"))


def weights_identity(weights: str | None) -> tuple:
    """Which Inception network the features come from: torch-fidelity's download, or a local file (path and size)."""
    if weights is None:
        return ("torch-fidelity download",)
    path = Path(weights).expanduser().resolve()
    return (str(path), path.stat().st_size)


def cache_key(dataset: Dataset, resolution: int, limit: int | None, seed: int, weights: str | None) -> str:
    """The cache name of a dataset's statistics: its identity, the resolution its images are prepared at, the subset
    (`limit` images drawn with `seed`; the seed does not matter when all images are used) and the Inception weights."""
    subset = ("all",) if limit is None or limit >= len(dataset) else (limit, seed)
    parts = (dataset.identity(), resolution, subset, weights_identity(weights))
    return "sagan-ref-" + hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def dataset_features(
    dataset: Dataset,
    inception: Inception,
    *,
    limit: int | None,
    seed: int,
    world: World,
    batch_size: int,
    num_workers: int,
    what: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Inception features of a dataset's images (all, or a seeded subset of `limit`), in the subset's order: every
    rank extracts its part; rank 0 returns all of them, the others None."""
    batches, part, overall = _rank_batches(
        dataset, limit=limit, seed=seed, world=world, batch_size=batch_size, num_workers=num_workers
    )
    pool, logits = inception.features(batches, total=part, what=what, world=world, overall=overall)
    return gather_rows(pool, world), None if logits is None else gather_rows(logits, world)


def dataset_moments(
    dataset: Dataset,
    inception: Inception,
    *,
    keep: bool,
    limit: int | None,
    seed: int,
    world: World,
    batch_size: int,
    num_workers: int,
    what: str,
    abandon: Callable[[], bool] | None = None,
) -> tuple[FeatureMoments, torch.Tensor | None]:
    """The moments of the Inception pool features of a dataset's images (all, or a seeded subset of `limit`), summed
    batch by batch on every rank and reduced once, and with `keep` the features themselves, gathered on rank 0 in
    the subset's order (None on the other ranks, and without `keep`). `abandon`: see `Inception.features`."""
    batches, part, overall = _rank_batches(
        dataset, limit=limit, seed=seed, world=world, batch_size=batch_size, num_workers=num_workers
    )
    moments = FeatureMoments(FEATURES)
    pool = inception.accumulate(
        batches, moments, keep=keep, total=part, what=what, world=world, overall=overall, abandon=abandon
    )
    moments.all_reduce(world)
    return moments, None if pool is None else gather_rows(pool, world)


def _rank_batches(
    dataset: Dataset, *, limit: int | None, seed: int, world: World, batch_size: int, num_workers: int
) -> tuple[Iterator[torch.Tensor], int, int]:
    """This rank's batches of a dataset's images (all, or a seeded subset of `limit`), how many images they hold and
    how many all ranks hold together."""
    images = ImageSubset(dataset, limit=limit, seed=seed)
    part = rank_part(len(images), world.rank, world.size)
    loader = DataLoader(Subset(images, part), batch_size=batch_size, num_workers=num_workers)
    return _unwrapped(loader), len(part), len(images)


def _unwrapped(loader: DataLoader) -> Iterator[torch.Tensor]:
    try:
        yield from loader
    except Exception as error:
        reraise_worker_error(error)


def statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma of (N, 2048) features, through torch-fidelity, in float64."""
    stats = fid_features_to_statistics(features.double())
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def _log_kept_features(n: int) -> None:
    """Say what keeping n reference images' pool features (float32) costs rank 0, which holds them all (while computing,
    each other rank holds its part). KID and precision/recall compare feature sets; FID needs only mu and sigma."""
    log.info(f"keeping the {n:,} reference features for KID/precision-recall: {n * FEATURES * 4 / 2**20:,.1f} MiB")


def dataset_reference(
    dataset: Dataset,
    inception: Inception,
    *,
    description: str,
    resolution: int,
    limit: int | None,
    seed: int,
    weights: str | None,
    cache_root: str,
    world: World,
    batch_size: int,
    num_workers: int = 0,
    need_features: bool = False,
    abandon: Callable[[], bool] | None = None,
) -> Reference:
    """The reference statistics of a dataset's images (and with `need_features` their features): read from the cache
    by rank 0, or computed by all ranks and cached by rank 0. `abandon`, asked between batches on every rank, gives
    up the computation (Abandoned) when it says so, and nothing is cached (`Inception.features`).

    mu and sigma are summed batch by batch (`FeatureMoments`): without `need_features` no rank holds more than a
    batch of features, and the cache holds statistics only. A cached file without features is computed again (and
    rewritten with them) when features are asked for; any cached file serves a request for statistics only.
    """
    n = min(len(dataset), limit or len(dataset))
    path = Path(cache_root).expanduser() / f"{cache_key(dataset, resolution, limit, seed, weights)}.npz"
    reference = Reference(description, None, None, n, resolution=resolution)
    cached = broadcast_object(_cached_arrays(path) if world.main else None, world)
    if cached is not None and (not need_features or "features" in cached):
        log.info(f"reference statistics of {description}: cached in {path}")
        if need_features:
            _log_kept_features(n)
        if world.main:
            _read_cache(path, reference, need_features)
        reference.cached = True
        return reference
    if cached is not None:
        log.info(f"reference statistics of {description}: cached in {path} without features, which KID/precision-recall need")
    log.info(f"reference statistics of {description} ({n} images): computing, then cached in {path}")
    if need_features:
        _log_kept_features(n)
    try:
        moments, features = dataset_moments(
            dataset, inception, keep=need_features, limit=limit, seed=seed, world=world, batch_size=batch_size,
            num_workers=num_workers, what="reference images", abandon=abandon,
        )  # fmt: skip
    except Abandoned:
        log.warning(f"reference statistics of {description}: abandoned, nothing cached (computed again next time)")
        raise
    if world.main:
        reference.mu, reference.sigma = moments.statistics()
        reference.features = features
        _write_cache(path, reference)
    barrier(world)  # the others go on once the cache is written
    return reference


def _cached_arrays(path: Path) -> list[str] | None:
    """The names of the arrays in a cached file, None when there is none or it cannot be read (it is then computed
    again and rewritten; an .npz reads only its directory here)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as saved:
            return list(saved.files)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        log.warning(f"cached reference statistics {path} cannot be read ({error}): computing them again")
        return None


def _read_cache(path: Path, reference: Reference, need_features: bool) -> None:
    """Fill `reference` with the statistics (and with `need_features` the features) of a cached file."""
    with np.load(path) as saved:  # an .npz reads each array only when asked for it
        reference.mu, reference.sigma = saved["mu"], saved["sigma"]
        reference.features = torch.from_numpy(saved["features"]) if need_features else None


def _write_cache(path: Path, reference: Reference) -> None:
    """Cache a computed reference (whole or not at all): its statistics, and its features when it has them.

    A write that fails (a full disk, a cache folder that cannot be written) only warns: the statistics are computed
    already and the evaluation goes on with them (the next one computes them again). Stopping would throw away the
    result for a cache, and under torchrun rank 0 alone writes: an error there would leave the others in the barrier.
    """
    features = {} if reference.features is None else {"features": reference.features.numpy()}
    try:
        write_statistics(
            path, mu=reference.mu, sigma=reference.sigma, num_images=reference.num_images,
            resolution=reference.resolution, **features,
        )  # fmt: skip
    except DiskFull as full:  # one line naming the file and the space
        log.warning(str(full.then("the reference statistics are used as computed, not cached (computed again next time)")))
    except OSError as error:
        log.warning(f"cannot cache reference statistics in {path} ({error}): used as computed, computed again next time")


def write_statistics(path: Path, **arrays: np.ndarray | int | None) -> None:
    """An .npz of `arrays`, whole or not at all (the folder made if needed); a full disk raises DiskFull, leaving no
    file behind."""
    needed = sum(np.asarray(a).nbytes for a in arrays.values()) + 1024 * len(arrays)  # + the archive's headers
    with space_for(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            np.savez(f, **arrays)
