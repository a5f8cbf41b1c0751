"""Image folders and zip archives as datasets: a directory tree (searched recursively) or a .zip read in place, labels
from a `dataset.json` (StyleGAN2-ADA's layout, what sagan-prepare writes) or else from the first sub-folder,
unreadable files named (or skipped, data.skip_bad)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from sagan.data.dataset_base import DatasetError, summary
from sagan.data.images import pil_to_tensor

log = logging.getLogger("sagan")

# Raster formats people keep datasets in, matched case-insensitively. PIL registers more extensions (.h5, .mpg,
# .eps, ...), but in a dataset folder those are rarely images and would turn stray files into "bad images".
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".webp",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
)  # fmt: skip

# What PIL and zipfile raise for unreadable, truncated or corrupt files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, Image.DecompressionBombError)


def _is_image_path(relpath: str) -> bool:
    """An image file by extension, not hidden and not macOS zip metadata (`__MACOSX/`, `._x.jpg`)."""
    parts = relpath.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return os.path.splitext(relpath)[1].lower() in IMAGE_EXTENSIONS


# The labels file of StyleGAN2-ADA's dataset_tool.py, at the root of a folder or zip: {"labels": [[relative path,
# class index], ...]} or {"labels": null}. sagan-prepare writes the same, and the class names under "classes".
MANIFEST = "dataset.json"


def read_manifest(path: Path, is_zip: bool) -> dict | None:
    """The folder's or zip's dataset.json, or None when it has none."""
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            if MANIFEST not in archive.namelist():
                return None
            text = archive.read(MANIFEST)
    elif (path / MANIFEST).is_file():
        text = (path / MANIFEST).read_bytes()
    else:
        return None
    try:
        manifest = json.loads(text)
    except ValueError as error:
        raise DatasetError(f"'{path}/{MANIFEST}' is not valid JSON ({error}): fix it, or delete it to label by sub-folder") from None
    if not isinstance(manifest, dict) or "labels" not in manifest:
        raise DatasetError(f"'{path}/{MANIFEST}' has no \"labels\" entry: write StyleGAN2-ADA's layout, or delete it")
    return manifest


def manifest_labels(manifest: dict, files: list[str], where: str) -> tuple[list[str], list[int]]:
    """(class names, the label of every file) from a dataset.json; ([], zeros) when its labels are null."""
    if manifest["labels"] is None:
        return [], [0] * len(files)
    table = {str(name): label for name, label in manifest["labels"]}
    missing = [f for f in files if f not in table]
    if missing:
        raise DatasetError(
            f"'{where}/{MANIFEST}' has no label for '{missing[0]}' ({len(missing)} of {len(files)} images): "
            "list every image in it, or delete it to label by sub-folder"
        )
    labels = [table[f] for f in files]
    if not all(isinstance(y, int) and not isinstance(y, bool) and y >= 0 for y in labels):
        raise DatasetError(
            f"'{where}/{MANIFEST}' labels must be class indices >= 0 (sagan conditions on classes, not label vectors)"
        )
    count = max(labels) + 1
    classes = [str(c) for c in manifest.get("classes") or range(count)]
    if len(classes) < count:
        raise DatasetError(f"'{where}/{MANIFEST}' names {len(classes)} classes but uses labels up to {count - 1}")
    return classes, labels


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
    With `labels=True` the class of an image is its entry in the root's dataset.json when there is one (StyleGAN2-ADA's
    layout; see MANIFEST), else the first path component below the root (sorted class names -> 0..K-1); if every
    image sits directly in the root, the dataset is unlabeled. Inside a zip the root is the
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
            if (path / MANIFEST).is_file():  # its labels, edited in place, change what the dataset is
                self.changed = max(self.changed, (path / MANIFEST).stat().st_mtime)
        if not self.files:
            raise DatasetError(f"no images found under '{root}' (looked for {', '.join(IMAGE_EXTENSIONS)})")

        in_subfolder = ["/" in f for f in self.files]
        manifest = read_manifest(path, self.is_zip) if labels else None
        if manifest is not None:
            self.classes, self.labels = manifest_labels(manifest, self.files, self.root)
        elif labels and all(in_subfolder):
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
                where = self.where(i)
                if not self.skip_bad:
                    raise DatasetError(
                        f"cannot read image '{where}' ({type(err).__name__}: {err}): replace or delete it,"
                        " or set data.skip_bad=true to skip unreadable files"
                    ) from err
                if where not in self.bad_files:
                    self.bad_files.add(where)
                    log.warning(f"skipped unreadable image '{where}' ({type(err).__name__}); {self.num_bad} skipped so far")
        raise DatasetError(f"no readable image under '{self.root}': every file failed to decode")

    def where(self, index: int) -> str:
        """Where item `index` lives, for messages: a file path, or `archive.zip/member`."""
        return f"{self.root}/{self.files[index]}" if self.is_zip else str(Path(self.root, self.files[index]))

    def native_size(self, index: int) -> tuple[int, int]:
        """(width, height) of image `index` as stored, before cropping and resizing."""
        with Image.open(self._source(index)) as img:
            return img.size

    sample_score = None  # no score of its own for generated samples

    def describe(self, name: str) -> str:
        return summary(self, f"folder '{self.root}'")

    def identity(self) -> tuple:
        """A zip's or folder's changes (files added, removed or renamed, its dataset.json rewritten) give new
        statistics; an image rewritten in place under the same name does not: clear the cache (metrics.cache_dir)
        after that."""
        names = hashlib.sha1("\n".join(self.files).encode()).hexdigest()
        path = str(Path(self.root).expanduser().resolve())
        return ("folder", path, len(self.files), names, int(self.changed), self.skip_bad)

    def native_side(self) -> int:
        return min(self.native_size(0))

    def all_labels(self) -> list[int]:
        """The label of every image, without decoding any."""
        return list(self.labels)

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
