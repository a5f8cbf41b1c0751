"""Evaluation during training: FID (and IS) of G_ema's samples against the training images, evaluated the way
`sagan-fid ref=train` evaluates a checkpoint, with the reference statistics from the shared cache."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sagan.evaluation.inception import Inception
from sagan.evaluation.metrics import evaluate_generator, inception_score_allowed
from sagan.evaluation.reference_stats import Reference, dataset_reference, default_cache_root
from sagan.utils.processes import World, main_rank_first


class TrainingEvaluator:
    """Called with G_ema, returns its metrics. The Inception network and the reference are prepared at the first
    call; every rank generates and runs Inception on its part of the samples. A call given `abandon` gives up
    (Abandoned) between two batches where that agreed check says so, in the reference statistics too (then computed
    again at the next call, never cached in part)."""

    def __init__(
        self,
        dataset: Any,
        *,
        resolution: int,
        num_samples: int,
        ref_images: int | None,
        seed: int,
        isc: bool,
        weights: str | None,
        cache_dir: str | None,
        batch_size: int,
        num_workers: int,
        device: torch.device,
        world: World,
    ) -> None:
        self.dataset, self.resolution, self.num_samples, self.ref_images, self.seed = (
            dataset, resolution, num_samples, ref_images, seed,
        )  # fmt: skip
        self.isc = inception_score_allowed(isc, weights)
        self.weights, self.cache_root = weights, cache_dir or default_cache_root()
        self.batch_size, self.num_workers, self.device, self.world = batch_size, num_workers, device, world
        self.inception: Inception | None = None
        self.reference: Reference | None = None

    def __call__(self, G_ema: nn.Module, *, abandon: Callable[[], bool] | None = None) -> dict[str, float]:
        if self.inception is None:
            with main_rank_first(self.world):  # rank 0 downloads the weights (if it must) before the others read them
                self.inception = Inception(weights=self.weights, device=self.device, logits=self.isc)
        if self.reference is None:
            self.reference = dataset_reference(
                self.dataset, self.inception, description="train", resolution=self.resolution, limit=self.ref_images,
                seed=self.seed, weights=self.weights, cache_root=self.cache_root, world=self.world,
                batch_size=self.batch_size, num_workers=self.num_workers, abandon=abandon,
            )  # fmt: skip
        # A copy in the default memory format: G_ema trains channels_last (perf.channels_last), which rounds some
        # convolutions differently, and `sagan-fid` evaluates the checkpoint in the default format.
        G = copy.deepcopy(G_ema).to(memory_format=torch.contiguous_format)
        return evaluate_generator(
            G, self.reference, self.inception, n=self.num_samples, seed=self.seed, batch_size=self.batch_size,
            world=self.world, fid=True, isc=self.isc, abandon=abandon,
        )  # fmt: skip
