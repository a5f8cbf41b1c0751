"""Datasets for SAGAN training and evaluation, by name: what `data=` and `ref=` build.

Every dataset returns `(image, label)`: `image` a uint8 tensor (3, R, R) in RGB, `label` an int (0 when the
dataset has no labels), and has `num_classes` (0 when unlabeled) and `classes`. Each also knows how to describe itself
for a run's log (`describe(name)`), what identifies its images for caches of their statistics (`identity()`), the
shorter side of its images as stored (`native_side()`, None when generated) and its own score of generated samples
(`sample_score`, None but for the demo). Images stay uint8 until they reach the device (4x less host memory and
transfer than float32); the trainer maps them to [-1, 1].

    cifar10 cifar100 stl10 celeba   torchvision datasets (sagan.data.torchvision_sets)
    folder                          a directory tree or a .zip of images (sagan.data.folders)
    demo                            synthetic mirror-symmetric shapes drawn by code (sagan.data.demo)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sagan.data.demo import MirrorShapes
from sagan.data.dataset_base import DatasetError
from sagan.data.folders import ImageFolder
from sagan.data.torchvision_sets import TORCHVISION_SPLITS, torchvision_dataset

DATASETS = ("cifar10", "cifar100", "stl10", "celeba", "folder", "demo")


def named_dataset(
    source: str,
    *,
    resolution: int,
    data_root: str | None,
    download: bool,
    labels: bool,
    also: str = "",
) -> Dataset:
    """The images a command-line `src=` or `ref=` names, prepared at `resolution` as training images are: an existing
    folder or .zip, `demo` (the generated demo images, seed 0), or a torchvision dataset as <name>-<split>
    (cifar10-train, stl10-unlabeled, ...) under `data_root`. `also`: what else the command accepts, for the error."""
    if source == "demo":
        return build_dataset("demo", root=None, resolution=resolution, labels=labels)
    path = Path(source).expanduser()
    if path.exists():
        return build_dataset("folder", root=str(path), resolution=resolution, labels=labels)
    name, _, split = source.partition("-")
    if name not in TORCHVISION_SPLITS:
        known = ", ".join(f"{n}-{s}" for n, splits in TORCHVISION_SPLITS.items() for s in splits)
        raise DatasetError(
            f"'{source}' is neither an existing folder or .zip nor a known dataset ({known}, demo{', ' + also if also else ''})"
        )
    return build_dataset(name, root=data_root, resolution=resolution, download=download, labels=labels, split=split or "train")


def training_dataset(config: dict, *, resolution: int, labels: bool) -> Dataset:
    """The data a run trained on, from the config its checkpoints keep (relative paths are relative to the current
    directory, as they were to the training command's). Never downloads."""
    data = config["data"]
    dataset = build_dataset(
        data["name"], root=data["root"], resolution=resolution, download=False, labels=labels, split=data["split"],
        skip_bad=data.get("skip_bad", False), size=data["size"], seed=config["train"]["seed"],
    )  # fmt: skip
    return with_fraction(dataset, data.get("fraction", 1.0))


class DataFraction(Dataset):
    """A fixed fraction of a training set (data.fraction), with its labels: a seeded random subset, the same for every
    run, seed and rank (seed 0), so runs on "10% of CIFAR-10" all see the same images."""

    def __init__(self, dataset: Dataset, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise DatasetError(f"data.fraction must be in (0, 1], got {fraction}")
        n = len(dataset)
        keep = max(1, round(n * fraction))
        self.dataset, self.fraction = dataset, fraction
        self.indices = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:keep].tolist())
        self.num_classes, self.classes = dataset.num_classes, dataset.classes
        self.sample_score = dataset.sample_score

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.indices[index]]

    def describe(self, name: str) -> str:
        whole = self.dataset.describe(name).split(",")[0]
        return f"{whole}, a seeded {self.fraction:g} of it: {len(self):,} of {len(self.dataset):,} images" + (
            f", {self.num_classes} classes" if self.num_classes else ", unlabeled"
        )

    def identity(self) -> tuple:
        return ("fraction", self.fraction, len(self), *self.dataset.identity())

    def native_side(self) -> int | None:
        return self.dataset.native_side()

    def all_labels(self) -> list[int]:
        labels = self.dataset.all_labels()
        return [labels[i] for i in self.indices]


class ClassImages(Dataset):
    """The images of one class of a labelled dataset (intra-FID compares each class with its own images)."""

    def __init__(self, dataset: Dataset, label: int) -> None:
        self.dataset, self.label = dataset, label
        self.indices = [i for i, y in enumerate(dataset.all_labels()) if y == label]
        self.num_classes, self.classes, self.sample_score = 0, [], None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.indices[index]]

    def describe(self, name: str) -> str:
        return f"{self.dataset.describe(name).split(',')[0]}, class {self.label}: {len(self):,} images"

    def identity(self) -> tuple:
        return ("class", self.label, *self.dataset.identity())

    def native_side(self) -> int | None:
        return self.dataset.native_side()


def with_fraction(dataset: Dataset, fraction: float) -> Dataset:
    return dataset if fraction == 1 else DataFraction(dataset, fraction)


class ImageSubset(Dataset):
    """The images of a dataset without their labels, or with `limit` a seeded random subset of that many (datasets
    are often sorted by class, so the first N would be a few classes only)."""

    def __init__(self, dataset: Dataset, limit: int | None = None, seed: int = 0) -> None:
        self.dataset = dataset
        n = len(dataset)
        self.indices = list(range(n))
        if limit is not None and limit < n:
            self.indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[self.indices[index]][0]


def build_dataset(
    name: str,
    *,
    root: str | None,
    resolution: int,
    download: bool = False,
    labels: bool = True,
    split: str = "train",
    skip_bad: bool = False,
    size: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Build dataset `name` at `resolution` x `resolution`. `size` and `seed` only apply to `demo`."""
    if resolution < 1:
        raise DatasetError(f"data.resolution must be a positive number of pixels, got {resolution}")
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}")
    root = None if root is None else os.path.expanduser(root)  # data.root='~/celeba'
    if size is not None and name != "demo":
        raise DatasetError(f"data.size={size} only applies to the demo dataset: leave it unset for {name}")
    if name == "demo":
        if size is not None and size < 1:
            raise DatasetError(f"data.size must be at least 1 for the demo dataset, got {size}")
        return MirrorShapes(size=10_000 if size is None else size, resolution=resolution, seed=seed, labels=labels)
    if name == "folder":
        if root is None:
            raise DatasetError("data.root is not set: the folder dataset needs data.root, a folder or .zip of images")
        return ImageFolder(root, resolution=resolution, labels=labels, skip_bad=skip_bad)
    return torchvision_dataset(name, root=root, resolution=resolution, download=download, labels=labels, split=split)
