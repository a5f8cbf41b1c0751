"""What generated images are compared with: Inception statistics of reference images, cached once per set of images,
and `.npz` statistics files (`mu`, `sigma`: the format pytorch-fid and the TTUR code exchange).

One cache, keyed one way: by what the images are (`dataset_identity`), the resolution they are prepared at, and the
subset. Training (`eval.every`) and `sagan-fid` therefore share statistics of the same data.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.metric_fid import fid_features_to_statistics

from sagan.atomic_files import atomic_write
from sagan.batch_stream import reraise_worker_error
from sagan.datasets import ImageSubset, dataset_identity
from sagan.dist import World, all_gather_rows, barrier, broadcast_object
from sagan.inception import Inception
from sagan.sampling import rank_part

log = logging.getLogger("sagan")

FEATURES = 2048


class ReferenceStatsError(ValueError):
    """Reference statistics that cannot be used as asked; the message says why and what to change."""


@dataclass
class Reference:
    """Statistics of reference images: mean and covariance of their Inception pool3 features (float64), and the
    features themselves when they were computed here (KID and precision/recall need them; a statistics file has none).
    """

    description: str  # what the protocol line names: "cifar10-train", a folder, a .npz file
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None  # None: a statistics file that does not say
    features: torch.Tensor | None = None
    cached: bool = False  # read from the cache, not computed now


def default_cache_root() -> str:
    """Where reference statistics are cached: $SAGAN_CACHE, else ~/.cache/sagan/reference_stats."""
    return os.environ.get("SAGAN_CACHE", str(Path.home() / ".cache" / "sagan" / "reference_stats"))


def cache_key(dataset: Dataset, resolution: int, limit: int | None, seed: int) -> str:
    """The cache name of a dataset's statistics: its identity, the resolution its images are prepared at, and the
    subset (`limit` images drawn with `seed`; the seed does not matter when all images are used)."""
    n = len(dataset)
    subset = ("all",) if limit is None or limit >= n else (limit, seed)
    return "sagan-ref-" + hashlib.sha1(repr((dataset_identity(dataset), resolution, subset)).encode()).hexdigest()[:16]


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inception features of a dataset's images (all, or a seeded subset of `limit`): every rank extracts its part,
    and every rank returns all of them, in the subset's order."""
    images = ImageSubset(dataset, limit=limit, seed=seed)
    part = rank_part(len(images), world.rank, world.size)
    loader = DataLoader(Subset(images, part), batch_size=batch_size, num_workers=num_workers)
    pool, logits = inception.features(_unwrapped(loader), total=len(part), what=what, report=world.main)
    return all_gather_rows(pool, world), None if logits is None else all_gather_rows(logits, world)


def _unwrapped(loader: DataLoader):
    try:
        yield from loader
    except Exception as error:
        reraise_worker_error(error)


def statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma of (N, 2048) features, through torch-fidelity, in float64."""
    stats = fid_features_to_statistics(features.double())
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def dataset_reference(
    dataset: Dataset,
    inception: Inception,
    *,
    description: str,
    resolution: int,
    limit: int | None,
    seed: int,
    cache_root: str,
    world: World,
    batch_size: int,
    num_workers: int = 0,
    need_features: bool = False,
) -> Reference:
    """The reference statistics of a dataset's images (and with `need_features` their features), from the cache or
    computed (on every rank, then cached by rank 0, features included)."""
    path = Path(cache_root).expanduser() / f"{cache_key(dataset, resolution, limit, seed)}.npz"
    if broadcast_object(path.is_file(), world):
        log.info(f"reference statistics of {description}: cached in {path}")
        with np.load(path) as saved:  # an .npz reads each array only when asked for it
            features = torch.from_numpy(saved["features"]) if need_features else None
            return Reference(description, saved["mu"], saved["sigma"], int(saved["num_images"]), features, cached=True)
    n = min(len(dataset), limit or len(dataset))
    log.info(f"reference statistics of {description} ({n} images): computing, then cached in {path}")
    features, _ = dataset_features(
        dataset,
        inception,
        limit=limit,
        seed=seed,
        world=world,
        batch_size=batch_size,
        num_workers=num_workers,
        what="reference images",
    )
    mu, sigma = statistics(features)
    if world.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, mu=mu, sigma=sigma, num_images=len(features), features=features.numpy())
        atomic_write(path, buffer.getvalue())
    barrier(world)
    return Reference(description, mu, sigma, len(features), features)


def load_reference_file(path: str | Path) -> Reference:
    """Statistics from a `.npz` file with `mu` (D,) and `sigma` (D, D), D = 2048 (and, if it says, `num_images`)."""
    path = Path(path).expanduser()
    try:
        saved = np.load(path)
    except (OSError, ValueError) as err:
        raise ReferenceStatsError(
            f"cannot read statistics file '{path}' ({err}): give a .npz file with mu and sigma"
        ) from None
    with saved:
        missing = [k for k in ("mu", "sigma") if k not in saved.files]
        if missing:
            raise ReferenceStatsError(
                f"statistics file '{path}' has no {' or '.join(missing)} (it holds {', '.join(saved.files) or 'nothing'}): "
                "give a .npz file with mu and sigma, as pytorch-fid and `sagan-fid save_ref=` write"
            )
        mu, sigma = saved["mu"], saved["sigma"]
        num_images = int(saved["num_images"]) if "num_images" in saved.files else None
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise ReferenceStatsError(
            f"statistics file '{path}' holds mu {mu.shape} and sigma {sigma.shape}, not ({FEATURES},) and "
            f"({FEATURES}, {FEATURES}): it is not made of Inception pool3 features"
        )
    return Reference(str(path), mu.astype(np.float64), sigma.astype(np.float64), num_images)


def save_reference_file(path: str | Path, reference: Reference) -> Path:
    """Write `mu`, `sigma` and `num_images` to a `.npz` file (written whole or not at all)."""
    if reference.num_images is None:
        raise ReferenceStatsError(f"save_ref={path}: only statistics computed from images here can be saved")
    path = Path(path).expanduser()
    if path.suffix != ".npz":
        raise ReferenceStatsError(f"save_ref={path}: the statistics file must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, mu=reference.mu, sigma=reference.sigma, num_images=reference.num_images)
    atomic_write(path, buffer.getvalue())
    return path
