"""Statistics files: `.npz` archives of `mu` (2048,) and `sigma` (2048, 2048), the format pytorch-fid and the TTUR
code exchange, read (checked, without pickle) and written (whole or not at all) for `sagan-fid ref=` and `save_ref=`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from sagan.evaluation.reference_stats import FEATURES, Reference, ReferenceStatsError, write_statistics


def load_reference_file(path: str | Path) -> Reference:
    """Statistics from a `.npz` file with `mu` (D,) and `sigma` (D, D), D = 2048 (and, if it says, `num_images` and
    `resolution`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReferenceStatsError(f"statistics file '{path}' does not exist")
    if not zipfile.is_zipfile(path):  # an .npz is a zip archive of .npy arrays
        raise ReferenceStatsError(f"'{path}' is not an .npz archive: give a .npz file with mu and sigma (np.savez)")
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {k: saved[k] for k in saved.files if k in ("mu", "sigma", "num_images", "resolution")}
    except (OSError, ValueError, zipfile.BadZipFile):
        raise ReferenceStatsError(
            f"cannot read the arrays of '{path}': give a .npz of plain numeric arrays mu and sigma"
        ) from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ReferenceStatsError(
            f"statistics file '{path}' has no {' or '.join(missing)}: give a .npz file with mu and sigma, as pytorch-fid "
            "and `sagan-fid save_ref=` write"
        )
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise ReferenceStatsError(
            f"statistics file '{path}' holds mu {mu.shape} and sigma {sigma.shape}, not ({FEATURES},) and "
            f"({FEATURES}, {FEATURES}): it is not made of Inception pool3 features"
        )
    num_images = int(arrays["num_images"]) if "num_images" in arrays else None
    resolution = int(arrays["resolution"]) if "resolution" in arrays else None
    return Reference(
        str(path), mu.astype(np.float64), sigma.astype(np.float64), num_images, resolution=resolution, is_file=True
    )


def check_save_path(path: str | Path) -> Path:
    """Where `save_ref=` writes, refused before any work if it cannot be a statistics file."""
    path = Path(path).expanduser()
    if path.suffix != ".npz":
        raise ReferenceStatsError(f"save_ref={path}: the statistics file must end in .npz")
    return path


def save_reference_file(path: str | Path, reference: Reference) -> Path:
    """Write `mu`, `sigma`, `num_images` and `resolution` to a `.npz` file (whole or not at all); rank 0's reference.
    The file was asked for (`save_ref=`): a full disk stops the command (DiskFull), unlike a cache write."""
    path = check_save_path(path)
    write_statistics(
        path, mu=reference.mu, sigma=reference.sigma, num_images=reference.num_images, resolution=reference.resolution
    )
    return path
