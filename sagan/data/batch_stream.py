"""An infinite, seeded, exactly resumable batch stream over a dataset.

`BatchStream` turns a dataset into endless batches whose order is a pure function of (seed, epoch, batch), so
resuming needs two integers and no RNG state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sagan.data.dataset_base import DatasetError, reraise_worker_error
from sagan.utils.processes import available_cpus
from sagan.utils.errors import UserError


MAX_WORKERS = 8  # default data-loading workers per process at most: more rarely help decode 32-256 px images


def default_num_workers() -> int:
    """Data-loading workers per process when `data.num_workers` (or `sagan-prepare`'s `workers=`) is unset: the CPUs
    this process may run on, shared among the training processes torchrun started on this machine, at most
    MAX_WORKERS."""
    return min(MAX_WORKERS, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Hash (seed, epoch) into one 64-bit seed: seeding with seed + epoch would make seed 1 replay seed 0 one epoch on.
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


class _Schedule:
    """The stream as a pure function: (epoch, batch) -> this rank's dataset indices and horizontal-flip bits."""

    def __init__(self, *, n: int, batch_size: int, rank: int, world_size: int, seed: int, hflip: bool) -> None:
        self.n = n
        self.batch_size = batch_size
        self.rank = rank
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = n // self.global_batch  # the last incomplete global batch is dropped
        self.seed = seed
        self.hflip = hflip
        self._epochs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if epoch not in self._epochs:
            generator = _epoch_generator(self.seed, epoch)
            order = torch.randperm(self.n, generator=generator)
            # Drawn after the order, so switching hflip on or off never changes which images come when.
            flips = torch.rand(self.n, generator=generator) < 0.5 if self.hflip else None  # one bit per item
            # Keep two epochs: a prefetching DataLoader runs into epoch e+1 while the stream still returns epoch e.
            if len(self._epochs) >= 2:
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = (order, flips)
        return self._epochs[epoch]

    def positions(self, batch: int) -> slice:
        """Where this rank's share of global batch `batch` sits in an epoch's order."""
        start = batch * self.global_batch + self.rank * self.batch_size
        return slice(start, start + self.batch_size)

    def indices(self, epoch: int, batch: int) -> torch.Tensor:
        """Dataset indices of this rank's share of global batch `batch` of `epoch`: (batch_size,) int64."""
        order, _ = self._plan(epoch)
        return order[self.positions(batch)]


class _IndexBatches:
    """DataLoader batch sampler: this rank's index lists, forever, from position `start` = (epoch, batch)."""

    def __init__(self, schedule: _Schedule) -> None:
        self.schedule = schedule
        self.start = (0, 0)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch = self.start
        while True:
            yield self.schedule.indices(epoch, batch).tolist()
            batch += 1
            if batch == self.schedule.batches_per_epoch:
                epoch, batch = epoch + 1, 0


class BatchStream:
    """An infinite stream of (images, labels) batches, a pure function of (seed, epoch, batch), so exactly resumable.

    Epoch e visits the dataset in the order `torch.randperm(N)` drawn from a generator seeded by (seed, e); the
    optional horizontal-flip bits (one per item) come from the same generator. A global batch is `batch_size *
    world_size` consecutive entries of that order and rank r takes the r-th slice of it, so 2 ranks of batch B see
    what 1 rank of batch 2B sees. The last incomplete global batch of each epoch is dropped. The global torch RNG is
    never touched.

    `in_memory=True` decodes the whole dataset once into a uint8 tensor on `device` (small datasets on the GPU:
    batches are tensor indexing). Otherwise a DataLoader with `num_workers` workers decodes batches; the position is
    counted in batches returned to the caller, not prefetched, so `state_dict()` is exact in both modes.

    Yields images (B, 3, R, R) uint8 and labels (B,) int64, both on `device`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        hflip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        in_memory: bool = False,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size=}, {rank=}, {world_size=}")
        n = len(dataset)
        if n < batch_size * world_size:
            raise DatasetError(
                f"the dataset has {n} images, fewer than one global batch of {batch_size * world_size}"
                f" (batch_size {batch_size} x world_size {world_size}): lower the batch size or use more images"
            )
        self.device = torch.device(device)
        self.schedule = _Schedule(n=n, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, hflip=hflip)
        self.batches_per_epoch = self.schedule.batches_per_epoch
        self.epoch = 0
        self.batch = 0  # (epoch, batch) of the next batch to return
        # The DataLoader draws worker seeds from this generator; without one it would consume the global RNG.
        self._generator = torch.Generator().manual_seed(seed)
        self._loader: DataLoader | None = None
        self._iterator: Iterator | None = None
        self._device_epoch = -1  # the epoch whose order and flips are on the device (see _device_plan)
        self._device_order: torch.Tensor | None = None
        self._device_flips: torch.Tensor | None = None
        if in_memory:
            images, labels = _decode_all(dataset, num_workers=num_workers, generator=self._generator)
            self._images, self._labels = images.to(self.device), labels.to(self.device)
        else:
            self._sampler = _IndexBatches(self.schedule)
            self._loader = DataLoader(
                dataset,
                batch_sampler=self._sampler,
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=num_workers > 0,
                generator=self._generator,
            )

    def __iter__(self) -> BatchStream:
        return self

    def _device_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This epoch's order and flip bits on the device, copied once per epoch: a host-to-GPU copy per batch would
        make the host wait for the GPU at every step."""
        if self._device_epoch != epoch:
            order, flips = self.schedule._plan(epoch)
            self._device_order = order.to(self.device)
            self._device_flips = None if flips is None else flips.to(self.device)
            self._device_epoch = epoch
        return self._device_order, self._device_flips

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, batch = self.epoch, self.batch
        order, flips = self._device_plan(epoch)
        index = order[self.schedule.positions(batch)]
        if self._loader is None:
            images, labels = self._images[index], self._labels[index]
        else:
            if self._iterator is None:  # first call, or after load_state_dict: restart the loader at our position
                self._sampler.start = (epoch, batch)
                self._iterator = iter(self._loader)
            try:
                images, labels = next(self._iterator)
            except Exception as error:
                reraise_worker_error(error)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        if flips is not None:
            images = torch.where(flips[index][:, None, None, None], images.flip(-1), images)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return images, labels

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch to return: all a resume needs."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state` (from `state_dict()`); the loader restarts there on the next batch."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise UserError(
                f"data stream state {state} is out of range ({self.batches_per_epoch} batches per epoch):"
                " was it saved with a different dataset, batch size or world size?"
            )
        self.epoch, self.batch = epoch, batch
        self._iterator = None


def _decode_all(dataset: Dataset, *, num_workers: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every item once, in order: images (N, 3, R, R) uint8 and labels (N,) int64."""
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers, generator=generator)
    images: torch.Tensor | None = None
    labels = torch.empty(len(dataset), dtype=torch.int64)
    start = 0
    try:
        for x, y in loader:
            if images is None:  # preallocate: concatenating chunks would briefly need twice the memory
                images = torch.empty((len(dataset), *x.shape[1:]), dtype=torch.uint8)
            images[start : start + len(x)] = x
            labels[start : start + len(x)] = y
            start += len(x)
    except Exception as error:
        reraise_worker_error(error)
    return images, labels
