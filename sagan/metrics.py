"""FID, IS, KID and precision/recall through torch-fidelity: the TF-ported Inception that papers' numbers use.

Generated images go to torch-fidelity straight from the generator, batch by batch, as uint8 (no temporary files).
Reference statistics are cached by torch-fidelity under a name that identifies the dataset, so the second
evaluation against the same data reads them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.generative_model_base import GenerativeModelBase

from sagan.data import to_uint8
from sagan.sample import draw

INCEPTION = "inception-v3-compat"  # torch-fidelity's port of the TF FID Inception (pt_inception-2015-12-05)
KEYS = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "is",
    "inception_score_std": "is_std",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
}


class MetricsError(ValueError):
    """Metrics that cannot be computed as asked: the message says why and what to change."""


class GeneratorSamples(GenerativeModelBase):
    """A generator as torch-fidelity sees it: z in, uint8 images out.

    A class-conditional G draws its own uniform labels from a seeded generator and tells torch-fidelity it is
    unconditional: torch-fidelity 0.4.0 draws labels with `np.int`, which NumPy removed, and crashes.
    """

    def __init__(self, G: nn.Module, *, seed: int = 0) -> None:
        super().__init__()
        self.G = G
        self.labels = torch.Generator().manual_seed(seed)

    @property
    def z_size(self) -> int:
        return self.G.z_dim

    @property
    def z_type(self) -> str:
        return "normal"

    @property
    def num_classes(self) -> int:
        return 0

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        device = next(self.G.parameters()).device
        y = None
        if self.G.num_classes:
            y = torch.randint(self.G.num_classes, (len(z),), generator=self.labels).to(device)
        images = self.G(z.to(device), y)
        return to_uint8(images)


def generate_share(G: nn.Module, n: int, *, seed: int, rank: int, world_size: int, batch_size: int) -> torch.Tensor:
    """This rank's share of `n` seeded samples of G (eval mode): uint8 on the CPU, zero-padded to ceil(n / world_size).

    Rank r draws images [r * share, (r + 1) * share) of the same n latents (`sagan.sample.draw`), so concatenating
    the shares in rank order gives the same images whatever the number of ranks.
    """
    share = -(-n // world_size)
    part = range(min(n, rank * share), min(n, (rank + 1) * share))
    images, _ = draw(G.eval(), n, seed=seed, choice=None, truncation=None, batch=batch_size, part=part)
    out = torch.zeros((share, *images.shape[1:]), dtype=torch.uint8)
    out[: len(images)] = images
    return out


class ImagesOnly(Dataset):
    """(image, label) items -> uint8 image items, the input torch-fidelity takes for datasets.

    With `limit`, a seeded random subset of that many items (datasets are often sorted by class, so the first N
    would be a few classes only).
    """

    def __init__(self, dataset: Dataset, limit: int | None = None, seed: int = 0) -> None:
        self.dataset = dataset
        n = len(dataset)
        self.indices = None
        if limit is not None and limit < n:
            self.indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist()

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index if self.indices is None else self.indices[index]][0]


def classifier_missing(weights: str | None) -> bool:
    """True if an Inception weights file has an all-zero classifier (like the offline pool3-only copy): its logits
    are all 0, so every Inception Score would be exactly 1.0."""
    if weights is None:
        return False
    state = torch.load(weights, map_location="cpu", weights_only=True)
    fc = state.get("fc.weight")
    return fc is None or not bool(fc.any())


def cache_name(*parts: Any) -> str:
    """A torch-fidelity cache name that changes with anything that changes the images (path, size, count, ...)."""
    return "sagan-" + hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def dataset_identity(root: str | None) -> tuple[str, int, int]:
    """(absolute path, size, mtime) of a dataset root, so a changed dataset gets new cached statistics."""
    if root is None:
        return ("", 0, 0)
    path = Path(root).expanduser().resolve()
    stat = path.stat()
    return (str(path), stat.st_size, int(stat.st_mtime))


@dataclass
class Protocol:
    """What a number depends on, printed beside it (papers differ on every one of these)."""

    num_samples: int
    reference: str
    reference_images: int
    resolution: int
    feature_extractor: str = INCEPTION
    weights: str = "torch-fidelity download (pt_inception-2015-12-05)"

    def describe(self) -> str:
        return (
            f"{self.num_samples} generated vs {self.reference_images} reference images ({self.reference}), "
            f"{self.resolution} px resized to 299 by the TF-compatible Inception ({self.feature_extractor}, "
            f"weights: {self.weights})"
        )


def compute_metrics(
    generated: nn.Module | Dataset,
    reference: Dataset,
    *,
    num_samples: int,
    reference_cache: str | None,
    fid: bool = True,
    isc: bool = True,
    kid: bool = False,
    prc: bool = False,
    weights: str | None = None,
    cache_root: str | None = None,
    kid_subset_size: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    verbose: bool = False,
) -> dict[str, float]:
    """Metrics of `generated` (a generator, or a dataset of images) against `reference` (a dataset of images).

    Returns {"fid": ..., "is": ..., "is_std": ..., "kid": ..., "kid_std": ..., "precision": ..., "recall": ...}
    for what was asked. IS needs the Inception classifier: with a weights file whose classifier is all zeros it
    raises MetricsError (ask for the other metrics alone).
    """
    if not (fid or isc or kid or prc):
        raise MetricsError("no metric asked for: set at least one of fid, isc, kid, prc")
    if isc and classifier_missing(weights):
        raise MetricsError(
            f"Inception Score refused: the classifier in '{weights}' is all zeros, so IS would always be 1.0; "
            "use torch-fidelity's own weights (leave the weights path unset, needs internet) or compute fid/kid/prc only"
        )
    n_generated = num_samples if isinstance(generated, nn.Module) else len(generated)
    if kid and min(n_generated, len(reference)) < kid_subset_size:
        raise MetricsError(
            f"KID needs at least kid_subset_size={kid_subset_size} images in each set, got {n_generated} generated "
            f"and {len(reference)} reference: use more images or a smaller kid_subset_size"
        )
    if n_generated < 2 or len(reference) < 2:
        raise MetricsError(f"need at least 2 images in each set, got {n_generated} generated and {len(reference)} reference")
    device = torch.device(device)
    if isinstance(generated, nn.Module):
        generated = GeneratorSamples(generated.eval(), seed=seed)
    kwargs: dict[str, Any] = {}
    if reference_cache is not None:
        kwargs |= {"cache": True, "input2_cache_name": reference_cache}
    if cache_root is not None:
        kwargs["cache_root"] = cache_root
    if weights is not None:
        kwargs["feature_extractor_weights_path"] = str(Path(weights).expanduser())
    if kid:
        kwargs["kid_subset_size"] = kid_subset_size
    with full_precision():
        raw = torch_fidelity.calculate_metrics(
            input1=generated,
            input2=reference,
            input1_model_num_samples=num_samples,
            fid=fid,
            isc=isc,
            kid=kid,
            prc=prc,
            cuda=device.type == "cuda",
            batch_size=batch_size,
            rng_seed=seed,
            samples_shuffle=False,
            save_cpu_ram=True,
            verbose=verbose,
            feature_extractor=INCEPTION,
            **kwargs,
        )
    return {KEYS[k]: float(v) for k, v in raw.items() if k in KEYS}


@contextmanager
def full_precision() -> Iterator[None]:
    """TF32 off (CUDA matmuls and convolutions in true fp32) inside the block, as before it afterwards: training turns
    it on for speed, but the Inception features that FID compares must match the reference implementation's."""
    # The allow_tf32 flags, as in `resolve_perf`: torch refuses reads of one API's flags after writes through the
    # other (fp32_precision), and torch.compile reads them through the old one.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def default_cache_root() -> str:
    """Where reference statistics are cached: $SAGAN_CACHE, else ~/.cache/sagan/fidelity."""
    return os.environ.get("SAGAN_CACHE", str(Path.home() / ".cache" / "sagan" / "fidelity"))
