"""Inception features through torch-fidelity: its port of the TF FID Inception (`inception-v3-compat`, the network of
the original FID and Inception Score code), which papers' numbers use. Always run with TF32 off."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch_fidelity.utils import create_feature_extractor

from sagan.evaluation.moments import FeatureMoments
from sagan.utils.processes import SINGLE, World, rank_part
from sagan.utils.full_precision import full_precision
from sagan.utils.progress import Progress

INCEPTION = "inception-v3-compat"
POOL, LOGITS = "2048", "logits_unbiased"  # pool3 features (FID, KID, precision/recall); classifier logits (IS)


class Abandoned(Exception):
    """Images given up between two batches because `abandon` said so (a stop request during training: the
    evaluation's result is not needed to resume, the checkpoint is). The message says how far it got."""


class Inception:
    """The FID Inception on `device`: uint8 images (B, 3, H, W) of any size in (resized to 299 inside, as the TF
    code does), pool3 features (B, 2048) and, with `logits=True`, classifier logits (B, 1008) out, float32 on the CPU.

    `weights` is a local copy of the network (torch-fidelity's `pt_inception-2015-12-05` layout); None downloads it.
    """

    def __init__(self, *, weights: str | None, device: torch.device, logits: bool = False) -> None:
        kwargs = {"verbose": False}
        if weights is not None:
            kwargs["feature_extractor_weights_path"] = str(Path(weights).expanduser())
        layers = [POOL, LOGITS] if logits else [POOL]
        self.net = create_feature_extractor(INCEPTION, layers, cuda=False, **kwargs).to(device)
        self.device, self.logits = device, logits

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with full_precision():
            out = self.net(images.to(self.device))
        return out[0].float().cpu(), out[1].float().cpu() if self.logits else None

    def features(
        self,
        batches: Iterable[torch.Tensor],
        *,
        total: int,
        what: str,
        world: World = SINGLE,
        overall: int | None = None,
        abandon: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of every image of `batches` (`total` in all: this rank's part of `overall`), in order. Rank 0
        reports progress every 10 s: "<what> done/total (rank 0's part of overall) | img/s | eta". `abandon`: see
        `_outputs`."""
        pool = torch.empty(total, 2048)
        logits = torch.empty(total, 1008) if self.logits else None
        outputs = self._outputs(batches, total=total, what=what, world=world, overall=overall, abandon=abandon)
        for start, pool_batch, logits_batch in outputs:
            pool[start : start + len(pool_batch)] = pool_batch
            if logits is not None:
                logits[start : start + len(logits_batch)] = logits_batch
        return pool, logits

    def accumulate(
        self,
        batches: Iterable[torch.Tensor],
        moments: FeatureMoments,
        *,
        keep: bool,
        total: int,
        what: str,
        world: World = SINGLE,
        overall: int | None = None,
        abandon: Callable[[], bool] | None = None,
    ) -> torch.Tensor | None:
        """Add the pool features of every image of `batches` to `moments`, batch by batch, so that memory does not
        grow with the number of images; with `keep` also return them (total, 2048), in order (KID and
        precision/recall need them), else None. Progress is reported as by `features`; logits are not kept."""
        pool = torch.empty(total, 2048) if keep else None
        outputs = self._outputs(batches, total=total, what=what, world=world, overall=overall, abandon=abandon)
        for start, pool_batch, _ in outputs:
            moments.update(pool_batch)
            if pool is not None:
                pool[start : start + len(pool_batch)] = pool_batch
        return pool

    def _outputs(
        self,
        batches: Iterable[torch.Tensor],
        *,
        total: int,
        what: str,
        world: World,
        overall: int | None,
        abandon: Callable[[], bool] | None,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """(index of its first image, pool3 features, logits) of each batch, in order, with rank 0 reporting progress;
        refuses a count of images other than `total`.

        `abandon`, when given, is asked before each batch is drawn; True raises Abandoned. Under torchrun it must be a
        check all ranks agree on (a collective, such as StopVote.poll): it is asked before the batches that every rank
        has (those starting below the last rank's part, the smallest: batches are equal in size on all ranks), so every
        rank asks it equally often and all give up at the same batch, before any rank waits in a gather.
        """
        smallest = len(rank_part(total if overall is None else overall, world.size - 1, world.size))
        note = f" (rank 0's part of {overall})" if world.size > 1 else ""
        progress = Progress(what=what, total=total, note=note) if world.main and total else None
        done, shown = 0, time.perf_counter()
        iterator = iter(batches)
        try:
            while True:
                if abandon is not None and done < smallest and abandon():
                    raise Abandoned(f"{what} {done}/{total}{note}")
                images = next(iterator, None)  # drawn only now: generating a batch is half the work
                if images is None:
                    break
                pool_batch, logits_batch = self(images)
                yield done, pool_batch, logits_batch
                done += len(images)
                if progress is not None and (time.perf_counter() - shown > 10 or done == total):
                    progress.update(done)
                    shown = time.perf_counter()
        finally:
            if progress is not None:
                progress.close()
        if done != total:
            raise RuntimeError(f"expected {total} images, got {done}")
