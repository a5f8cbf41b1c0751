"""Datasets for SAGAN training and an infinite, seeded, exactly resumable batch stream.

Every dataset returns `(image, label)`: `image` a uint8 tensor (3, R, R) in RGB, `label` an int (0 when the
dataset has no labels), and has `num_classes` (0 when unlabeled) and `classes`. Images stay uint8 until they reach
the device (4x less host memory and transfer than float32); the trainer maps them to [-1, 1].

    cifar10 cifar100 stl10 celeba   torchvision datasets, cropped and resized like every other image
    folder                          a directory tree or a .zip of images; labels from the first sub-folder
    demo                            synthetic mirror-symmetric shapes drawn by code (no files), see `MirrorShapes`

`BatchStream` turns a dataset into endless batches whose order is a pure function of (seed, epoch, batch), so
resuming needs two integers and no RNG state.
"""

from __future__ import annotations

import io
import logging
import os
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

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


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range of G's tanh."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float [-1, 1] (generator output) -> uint8 [0, 255], rounded."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class DatasetError(ValueError):
    """A dataset cannot be built or read; the message names the problem and the config key that fixes it."""


def default_num_workers() -> int:
    """Data-loading workers per process when `data.num_workers` is unset: the CPUs this process may run on, shared
    among the training processes torchrun started on this machine, at most 8 (more rarely helps decode 32-256 px)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def describe_dataset(dataset: Dataset, name: str) -> str:
    """What a run trains on, for its log: the source, the number of images and the classes."""
    source = name
    if isinstance(dataset, ImageFolder):
        source = f"folder '{dataset.root}'"
    elif isinstance(dataset, TorchvisionImages):
        source = f"{name} ({type(dataset.base).__name__} under '{dataset.base.root}')"
    elif isinstance(dataset, MirrorShapes):
        source = "demo (generated mirror-symmetric shapes)"
    classes = getattr(dataset, "classes", [])
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return f"{source}, {len(dataset):,} images, " + (f"{len(classes)} classes ({shown})" if classes else "unlabeled")


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
        return MirrorShapes(size=10_000 if size is None else size, resolution=resolution, seed=seed, labels=labels)
    if name == "folder":
        if root is None:
            raise DatasetError("data.root is not set: the folder dataset needs data.root, a folder or .zip of images")
        return ImageFolder(root, resolution=resolution, labels=labels, skip_bad=skip_bad)
    return _torchvision_dataset(name, root=root, resolution=resolution, download=download, labels=labels, split=split)


def pil_to_tensor(img: Image.Image, *, resolution: int) -> torch.Tensor:
    """Any-mode PIL image -> RGB, center-cropped to a square, resized (bicubic) -> (3, resolution, resolution) uint8."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        # 16-bit greyscale: convert("RGB") clips at 255, which would turn most pixels white; keep the high byte.
        img = Image.fromarray((np.asarray(img, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    img = img.convert("RGB")  # L, LA, P, RGBA (alpha dropped), CMYK, ... -> RGB
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        # PIL's bicubic filter widens with the scale factor when downsampling, so it is antialiased.
        img = img.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


# ---------------------------------------------------------------------------------------------------------------------
# torchvision datasets


class TorchvisionImages(Dataset):
    """A torchvision dataset of (PIL image, target) pairs, cropped and resized like every other dataset here."""

    def __init__(self, base: Dataset, *, resolution: int, classes: list[str]) -> None:
        self.base = base
        self.resolution = resolution
        self.classes = classes
        self.num_classes = len(classes)

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
    return TorchvisionImages(base, resolution=resolution, classes=list(base.classes) if labeled else [])


# ---------------------------------------------------------------------------------------------------------------------
# Image folders and zip archives


def _is_image_path(relpath: str) -> bool:
    """An image file by extension, not hidden and not macOS zip metadata (`__MACOSX/`, `._x.jpg`)."""
    parts = relpath.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return os.path.splitext(relpath)[1].lower() in IMAGE_EXTENSIONS


def _list_directory(root: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # do not descend into .git, .cache, ...
        for filename in filenames:
            files.append(Path(dirpath, filename).relative_to(root).as_posix())
    return sorted(f for f in files if _is_image_path(f))


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
        self.files = _list_zip(path) if self.is_zip else _list_directory(path)
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


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic demo dataset

# Few bold colours on a black background: simple enough that a small GAN draws them in minutes on a CPU.
_PALETTE = ((235, 45, 45), (45, 205, 70), (55, 95, 245), (245, 220, 40))
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges


class MirrorShapes(Dataset):
    """Synthetic images that need long-range consistency: the right half is the exact mirror of the left half.

    Each image has one bold filled shape (circle, square or triangle: the label; 10-14 px at 32 px, scaled with the
    resolution) in one of four saturated colours, somewhere in the left half of a black image, and its mirror image
    in the right half, so a generator must repeat on the right what it drew on the left, half a picture away.
    Kept this simple so a small GAN learns it in minutes on a CPU. Images are drawn on demand from (seed, index):
    no files, any size, identical in every process.
    """

    classes = ["circle", "square", "triangle"]

    def __init__(self, *, size: int = 10_000, resolution: int = 32, seed: int = 0, labels: bool = True) -> None:
        if size < 1:
            raise DatasetError(f"data.size must be at least 1 for the demo dataset, got {size}")
        self.size = size
        self.resolution = resolution
        self.seed = seed
        self.num_classes = 3 if labels else 0
        if not labels:
            self.classes = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} demo images")
        # A string seed is hashed (SHA-512) by random.Random: no collisions between (seed, index) pairs.
        rng = random.Random(f"mirror-shapes/{self.seed}/{index}")
        r, s = self.resolution, _SUPERSAMPLE
        canvas = Image.new("RGB", (r * s, r * s), (0, 0, 0))
        draw = ImageDraw.Draw(canvas)

        kind, colour = rng.randrange(3), rng.choice(_PALETTE)
        size = rng.uniform(10, 14) * r / 32  # 10-14 px at 32 px
        gap = r / 32  # 1 px at 32 px: keeps the shape from touching its mirror image across the axis
        cx = rng.uniform(size / 2, r / 2 - size / 2 - gap)
        cy = rng.uniform(size / 2, r - size / 2)
        x0, y0, x1, y1 = ((cx - size / 2) * s, (cy - size / 2) * s, (cx + size / 2) * s, (cy + size / 2) * s)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon(((cx * s, y0), (x0, y1), (x1, y1)), fill=colour)

        image = pil_to_tensor(canvas.resize((r, r), resample=Image.Resampling.BOX), resolution=r)
        half = r // 2
        image[:, :, r - half :] = image[:, :, :half].flip(-1)  # mirror after downsampling: exact to the last bit
        return image, kind if self.num_classes else 0


def mirror_consistency(images: torch.Tensor, eps: float = 1e-6) -> float:
    """How mirror-symmetric a batch is, relative to chance: 1 = exactly symmetric, about 0 = unrelated halves.

    d_self = mean |x - fliplr(x)| and d_other = mean |x - fliplr(x rolled by one along the batch)|, and the score is
    (d_other - d_self) / (d_other + eps) = 1 - (d_self + eps) / (d_other + eps). Comparing against other images
    of the same batch makes the score scale-free and keeps near-constant images (an untrained generator) near 0:
    their d_self is small, but so is d_other. eps on both sides makes an exactly constant batch score 0, not 1.

    images: (B, 3, H, W), uint8 or float in [-1, 1], B >= 2.
    """
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"mirror_consistency needs a batch (B >= 2, C, H, W), got shape {tuple(images.shape)}")
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    mirrored = x.flip(-1)
    d_self = (x - mirrored).abs().mean()
    d_other = (x - mirrored.roll(1, dims=0)).abs().mean()
    return float((d_other - d_self) / (d_other + eps))


# ---------------------------------------------------------------------------------------------------------------------
# The batch stream


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
            raise ValueError(
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
