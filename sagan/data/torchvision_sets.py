"""torchvision's datasets (CIFAR-10, CIFAR-100, STL-10, CelebA), cropped and resized like every other image here."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from sagan.data.dataset_base import DatasetError, summary
from sagan.data.images import pil_to_tensor

# Splits each torchvision dataset accepts (STL-10's "unlabeled" part is the 100k images usually used for GANs).
TORCHVISION_SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
    "celeba": ("train", "valid", "test", "all"),
}


class TorchvisionImages(Dataset):
    """A torchvision dataset of (PIL image, target) pairs, cropped and resized like every other dataset here."""

    def __init__(self, base: Dataset, *, resolution: int, classes: list[str], name: str, split: str) -> None:
        self.base = base
        self.resolution = resolution
        self.classes = classes
        self.num_classes = len(classes)
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = self.base[index]
        label = int(target) if self.num_classes > 0 else 0
        return pil_to_tensor(img, resolution=self.resolution), label

    sample_score = None  # no score of its own for generated samples

    def describe(self, name: str) -> str:
        return summary(self, f"{name}-{self.split} ({type(self.base).__name__} under '{self.base.root}')")

    def identity(self) -> tuple:
        return (self.name, self.split, str(Path(self.base.root).expanduser().resolve()))

    def native_side(self) -> int:
        return min(self.base[0][0].size)

    def all_labels(self) -> list[int]:
        """The label of every image, without decoding any (torchvision keeps them as targets or labels)."""
        if self.num_classes == 0:
            return [0] * len(self)
        targets = getattr(self.base, "targets", None)
        return [int(t) for t in (targets if targets is not None else self.base.labels)]


def torchvision_dataset(
    name: str, *, root: str | None, resolution: int, download: bool, labels: bool, split: str
) -> TorchvisionImages:
    # Imported here: torchvision is slow to import and only these four datasets need it.
    from torchvision import datasets

    if split not in TORCHVISION_SPLITS[name]:
        raise DatasetError(f"data.split '{split}' is not a split of {name}: use one of {', '.join(TORCHVISION_SPLITS[name])}")
    if root is None:
        raise DatasetError(f"data.root is not set: set it to the folder that holds {name} (or will, with data.download=true)")
    if not download and not Path(root).exists():
        raise DatasetError(f"data.root '{root}' does not exist: set data.root to the folder holding {name}, or set data.download=true")
    try:
        if name == "cifar10":
            base = datasets.CIFAR10(root, train=split == "train", download=download)
        elif name == "cifar100":
            base = datasets.CIFAR100(root, train=split == "train", download=download)
        elif name == "stl10":
            base = datasets.STL10(root, split=split, download=download)
        else:
            base = datasets.CelebA(root, split=split, target_type=[], download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DatasetError(f"{name} not found under data.root '{root}' ({err}): set data.download=true or fix data.root") from err
    except OSError as err:  # urllib's URLError is an OSError: no network, proxy, server down
        raise DatasetError(
            f"could not download {name} into data.root '{root}' ({err}): check the network, or download it by hand "
            "into that folder"
        ) from err
    # CelebA has attributes, not classes; STL-10's unlabeled images carry label -1, so any split that includes them
    # is treated as unlabeled rather than mixing real and fake labels.
    labeled = labels and name != "celeba" and "unlabeled" not in split
    classes = list(base.classes) if labeled else []
    return TorchvisionImages(base, resolution=resolution, classes=classes, name=name, split=split)
