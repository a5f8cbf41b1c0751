"""Datasets for SAGAN training and evaluation.

Every dataset returns `(image, label)`: `image` a uint8 tensor (3, R, R) in RGB, `label` an int (0 when the
dataset has no labels), and has `num_classes` (0 when unlabeled) and `classes`. Images stay uint8 until they reach
the device (4x less host memory and transfer than float32); the trainer maps them to [-1, 1].

    cifar10 cifar100 stl10 celeba   torchvision datasets, cropped and resized like every other image
    folder                          a directory tree or a .zip of images; labels from the first sub-folder
    demo                            synthetic mirror-symmetric shapes drawn by code (no files): sagan.demo_data
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from sagan.demo_data import MirrorShapes
from sagan.images import pil_to_tensor

log = logging.getLogger("sagan")

DATASETS = ("cifar10", "cifar100", "stl10", "celeba", "folder", "demo")

# Splits each torchvision dataset accepts (STL-10's "unlabeled" part is the 100k images usually used for GANs).
TORCHVISION_SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
    "celeba": ("train", "valid", "test", "all"),
}

# Raster formats people keep datasets in, matched case-insensitively. PIL registers more extensions (.h5, .mpg,
# .eps, ...), but in a dataset folder those are rarely images and would turn stray files into "bad images".
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".webp",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
)  # fmt: skip

# What PIL and zipfile raise for unreadable, truncated or corrupt files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A dataset cannot be built or read; the message names the problem and the config key that fixes it."""


def reraise_worker_error(error: Exception) -> None:
    """Raise an error that a dataset raised inside a DataLoader worker as the dataset raised it; others unchanged.

    The DataLoader re-raises it in the main process as the same type, but with the worker's whole traceback as its
    message; the original message is the traceback's last line, after the type's name.
    """
    text = str(error)
    last = text.strip().splitlines()[-1] if "Original Traceback" in text else ""
    kind, _, message = last.partition(": ")
    if message and kind.rsplit(".", 1)[-1] == type(error).__name__:
        try:
            unwrapped = type(error)(message)
        except TypeError:  # an exception type that takes other arguments: keep the wrapped one
            raise error
        raise unwrapped from None
    raise error


def describe_dataset(dataset: Dataset, name: str) -> str:
    """What a run trains on, for its log: the source, the number of images and the classes."""
    if isinstance(dataset, DataFraction):
        whole = describe_dataset(dataset.dataset, name).split(",")[0]
        return f"{whole}, a seeded {dataset.fraction:g} of it: {len(dataset):,} of {len(dataset.dataset):,} images" + (
            f", {dataset.num_classes} classes" if dataset.num_classes else ", unlabeled"
        )
    source = name
    if isinstance(dataset, ImageFolder):
        source = f"folder '{dataset.root}'"
    elif isinstance(dataset, TorchvisionImages):
        source = f"{name}-{dataset.split} ({type(dataset.base).__name__} under '{dataset.base.root}')"
    elif isinstance(dataset, MirrorShapes):
        source = "demo (generated mirror-symmetric shapes)"
    classes = getattr(dataset, "classes", [])
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return f"{source}, {len(dataset):,} images, " + (f"{len(classes)} classes ({shown})" if classes else "unlabeled")


def dataset_identity(dataset: Dataset) -> tuple:
    """What identifies a dataset's images (before cropping and resizing), for caches of their statistics: the same
    images give the same tuple, however the dataset was asked for (`data=` in training, `ref=` in sagan-fid)."""
    if isinstance(dataset, DataFraction):
        return ("fraction", dataset.fraction, len(dataset), *dataset_identity(dataset.dataset))
    if isinstance(dataset, MirrorShapes):
        return ("demo", len(dataset), dataset.seed)
    if isinstance(dataset, TorchvisionImages):
        return (dataset.name, dataset.split, str(Path(dataset.base.root).expanduser().resolve()))
    if isinstance(dataset, ImageFolder):
        # A zip's or folder's changes (files added, removed or renamed) give new statistics; a file rewritten in place
        # under the same name does not: clear the cache (metrics.cache_dir) after that.
        names = hashlib.sha1("\n".join(dataset.files).encode()).hexdigest()
        path = str(Path(dataset.root).expanduser().resolve())
        return ("folder", path, len(dataset.files), names, int(dataset.changed), dataset.skip_bad)
    raise TypeError(f"no identity for {type(dataset).__name__}")


def training_dataset(config: dict, *, resolution: int, labels: bool) -> Dataset:
    """The data a run trained on, from the config its checkpoints keep (relative paths are relative to the current
    directory, as they were to the training command's). Never downloads."""
    data = config["data"]
    dataset = build_dataset(
        data["name"], root=data["root"], resolution=resolution, download=False, labels=labels, split=data["split"],
        skip_bad=data.get("skip_bad", False), size=data["size"], seed=config["train"]["seed"],
    )  # fmt: skip
    return with_fraction(dataset, data.get("fraction", 1.0))


def native_side(dataset: Dataset) -> int | None:
    """The shorter side of the first image as stored, before cropping and resizing (None for the generated demo)."""
    if isinstance(dataset, ImageFolder):
        return min(dataset.native_size(0))
    if isinstance(dataset, TorchvisionImages):
        return min(dataset.base[0][0].size)
    return None


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
        self.num_classes, self.classes = dataset.num_classes, getattr(dataset, "classes", [])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.indices[index]]


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
    return _torchvision_dataset(name, root=root, resolution=resolution, download=download, labels=labels, split=split)


# ---------------------------------------------------------------------------------------------------------------------
# torchvision datasets


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


def _torchvision_dataset(
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


# ---------------------------------------------------------------------------------------------------------------------
# Image folders and zip archives


def _is_image_path(relpath: str) -> bool:
    """An image file by extension, not hidden and not macOS zip metadata (`__MACOSX/`, `._x.jpg`)."""
    parts = relpath.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return os.path.splitext(relpath)[1].lower() in IMAGE_EXTENSIONS


def _list_directory(root: Path) -> tuple[list[str], float]:
    """The image files under `root` (sorted relative paths) and the newest modification time of its folders (adding,
    removing or renaming a file changes its folder's)."""
    files, newest = [], 0.0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # do not descend into .git, .cache, ...
        newest = max(newest, os.stat(dirpath).st_mtime)
        for filename in filenames:
            files.append(Path(dirpath, filename).relative_to(root).as_posix())
    return sorted(f for f in files if _is_image_path(f)), newest


def _list_zip(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return sorted(n for n in archive.namelist() if not n.endswith("/") and _is_image_path(n))


class ImageFolder(Dataset):
    """Images in a directory tree (searched recursively) or a .zip archive (read in place, never extracted).

    Files are sorted by their path below the root, so a folder and a zip of the same tree give identical items.
    With `labels=True` the class of an image is the first path component below the root (sorted class names ->
    0..K-1); if every image sits directly in the root, the dataset is unlabeled. Inside a zip the root is the
    archive itself, so a zip whose members all sit under one top folder is a single class.

    With `skip_bad=True` unreadable files are found lazily, not by decoding everything up front (slow for big
    sets): a bad item is replaced by the next readable one and recorded in `bad_files`. Each DataLoader worker
    keeps its own record, so `num_bad` counts what this process has seen.
    """

    def __init__(self, root: str | os.PathLike, *, resolution: int, labels: bool = True, skip_bad: bool = False) -> None:
        path = Path(root)
        if not path.exists():
            raise DatasetError(
                f"data.root '{root}' does not exist: set data.root to a folder or .zip of images"
                " (or use a torchvision dataset such as cifar10 with data.download=true)"
            )
        if path.is_file() and not zipfile.is_zipfile(path):
            raise DatasetError(f"data.root '{root}' is a file but not a .zip archive: point it at a folder or .zip of images")
        self.root = str(root)
        self.resolution = resolution
        self.skip_bad = skip_bad
        self.is_zip = path.is_file()
        if self.is_zip:
            self.files, self.changed = _list_zip(path), path.stat().st_mtime
        else:
            self.files, self.changed = _list_directory(path)
        if not self.files:
            raise DatasetError(f"no images found under '{root}' (looked for {', '.join(IMAGE_EXTENSIONS)})")

        in_subfolder = ["/" in f for f in self.files]
        if labels and all(in_subfolder):
            self.classes = sorted({f.split("/", 1)[0] for f in self.files})
            class_index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [class_index[f.split("/", 1)[0]] for f in self.files]
        elif labels and any(in_subfolder):
            raise DatasetError(
                f"'{root}' has images both directly in it and in sub-folders, so classes are ambiguous:"
                " put every image in a class sub-folder, or train unconditionally (model.conditional=false)"
            )
        else:
            self.classes = []
            self.labels = [0] * len(self.files)
        self.num_classes = len(self.classes)
        self.bad_files: set[str] = set()
        self._archive: zipfile.ZipFile | None = None
        self._archive_pid: int | None = None

    @property
    def num_bad(self) -> int:
        """How many distinct unreadable files this process has skipped."""
        return len(self.bad_files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.files)
        for offset in range(n):
            i = (index + offset) % n
            try:
                return self._decode(i), self.labels[i]
            except _DECODE_ERRORS as err:
                where = self.describe(i)
                if not self.skip_bad:
                    raise DatasetError(
                        f"cannot read image '{where}' ({type(err).__name__}: {err}): replace or delete it,"
                        " or set data.skip_bad=true to skip unreadable files"
                    ) from err
                if where not in self.bad_files:
                    self.bad_files.add(where)
                    log.warning(f"skipped unreadable image '{where}' ({type(err).__name__}); {self.num_bad} skipped so far")
        raise DatasetError(f"no readable image under '{self.root}': every file failed to decode")

    def describe(self, index: int) -> str:
        """Where item `index` lives, for messages: a file path, or `archive.zip/member`."""
        return f"{self.root}/{self.files[index]}" if self.is_zip else str(Path(self.root, self.files[index]))

    def native_size(self, index: int) -> tuple[int, int]:
        """(width, height) of image `index` as stored, before cropping and resizing."""
        with Image.open(self._source(index)) as img:
            return img.size

    def _source(self, index: int) -> io.BytesIO | Path:
        relpath = self.files[index]
        return io.BytesIO(self._zip().read(relpath)) if self.is_zip else Path(self.root, relpath)

    def _decode(self, index: int) -> torch.Tensor:
        with Image.open(self._source(index)) as img:
            img.load()  # decode now, so a truncated file fails here and not somewhere inside convert()
            return pil_to_tensor(img, resolution=self.resolution)

    def _zip(self) -> zipfile.ZipFile:
        # One handle per process, opened on first use: a handle inherited through fork shares its file offset with
        # the parent, so DataLoader workers reading through it would corrupt each other's reads.
        if self._archive is None or self._archive_pid != os.getpid():
            self._archive = zipfile.ZipFile(self.root)
            self._archive_pid = os.getpid()
        return self._archive

    def __getstate__(self) -> dict:
        # Workers started by spawn/forkserver receive a pickled copy; open files do not pickle.
        return {**self.__dict__, "_archive": None, "_archive_pid": None}
