"""A dataset prepared once (sagan-prepare): every image through the training path (RGB, centre crop, bicubic resize)
into one zip of PNGs at the training resolution, with StyleGAN2-ADA's `dataset.json` of labels, so that a zip made by
either tool trains in the other and the data loader only decodes small PNGs.

Layout (StyleGAN2-ADA's dataset_tool.py): image i of the source is `{i // 1000:05d}/img{i:08d}.png`; `dataset.json`
holds {"labels": [[name, class], ...]} (null when unlabelled) and, ours only, "classes": the class names.

Work is done in chunks of CHUNK images by DataLoader worker processes; each finished chunk is a small zip in
`<out>.parts/`, written atomically, so a run that is interrupted (killed, pre-empted, a full disk, a bad file) and
started again with the same source and resolution continues after its last whole chunk. The chunks are then copied
into `<out>` (written atomically: a temporary file renamed when complete) and the parts folder is removed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sagan.data.dataset_base import DatasetError, reraise_worker_error
from sagan.data.folders import MANIFEST
from sagan.utils.atomic_files import atomic_file, atomic_write, space_for
from sagan.utils.directory_lock import DirectoryBusy, LocksUnsupported, describe, lock_directory
from sagan.utils.progress import Progress

log = logging.getLogger("sagan")

CHUNK = 1000  # images per part file (and per folder of the zip, as StyleGAN2-ADA's)
JOB = "job.json"  # what the parts folder is a job for: a restart with other arguments is refused
CHUNK_MANIFEST = "chunk.json"


def member_name(index: int) -> str:
    """The zip member of source image `index`, as StyleGAN2-ADA's dataset_tool names it."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def encode_png(image: torch.Tensor) -> bytes:
    """A uint8 (3, R, R) image as PNG bytes (lossless: the loader decodes exactly these pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


class EncodedImages(Dataset):
    """Item i of a dataset as (i, PNG bytes, label, None), or (i, None, 0, what failed) for an unreadable file: run in
    the DataLoader's workers, so decoding, resizing and encoding all happen outside the main process."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, bytes | None, int, str | None]:
        try:
            image, label = self.dataset[index]
        except DatasetError as error:
            cause = error.__cause__
            where = self.dataset.where(index) if hasattr(self.dataset, "where") else f"item {index}"
            return index, None, 0, f"{where} ({type(cause).__name__}: {cause})" if cause else f"{where} ({error})"
        return index, encode_png(image), int(label), None


@dataclass
class Prepared:
    """What a preparation did: images written, unreadable files left out, chunks reused from an interrupted run."""

    path: Path
    images: int
    skipped: list[str] = field(default_factory=list)
    reused_chunks: int = 0


def prepare(dataset: Dataset, out: Path, *, job: dict, workers: int, skip_bad: bool) -> Prepared:
    """Write `dataset` (already at its training resolution) as a prepared zip at `out`; see the module docstring.
    `job` identifies the source and settings: the parts of an interrupted run are reused only for the same job."""
    parts = out.with_name(out.name + ".parts")
    chunks = range((len(dataset) + CHUNK - 1) // CHUNK)
    lock = _lock(parts, out)
    try:
        done = _start(parts, job)
        todo = [c for c in chunks if c not in done]
        if done:
            log.info(f"continuing {out}: {len(done)} of {len(chunks)} chunks were done by an earlier run ({parts})")
        if not skip_bad:
            _refuse_earlier_skips(parts, done)
        start = sum(_chunk_size(c, len(dataset)) for c in done)
        _encode(dataset, parts, todo, workers=workers, skip_bad=skip_bad, start=start)
        prepared = _merge(parts, [_chunk_path(parts, c) for c in chunks], out, classes=list(dataset.classes))
        prepared.reused_chunks = len(done)
        shutil.rmtree(parts)
    finally:
        if lock is not None:
            os.close(lock)
    return prepared


def _lock(parts: Path, out: Path) -> int | None:
    """Hold the lock of the parts folder for this run, so that two runs never write one job's chunks (None where the
    filesystem has no file locks: said, and the run goes on)."""
    try:
        return lock_directory(parts)
    except DirectoryBusy as e:
        raise DatasetError(
            f"{out} is being prepared by {describe(e.holder)} ({parts} is locked): wait for it to finish, or write "
            "another out="
        ) from None
    except LocksUnsupported as e:
        log.warning(f"cannot lock {parts} ({e.strerror}): nothing stops a second sagan-prepare writing {out} meanwhile")
        return None


def _chunk_path(parts: Path, chunk: int) -> Path:
    return parts / f"chunk_{chunk:06d}.zip"


def _chunk_size(chunk: int, total: int) -> int:
    return min(CHUNK, total - chunk * CHUNK)


def _start(parts: Path, job: dict) -> set[int]:
    """The parts folder for `job`: created, or an earlier run's for the same job (its whole chunks returned)."""
    record = parts / JOB
    if record.is_file():
        earlier = json.loads(record.read_text())
        if earlier != job:
            changed = ", ".join(k for k in sorted(set(job) | set(earlier)) if job.get(k) != earlier.get(k))
            raise DatasetError(
                f"{parts} holds an unfinished preparation with other settings ({changed} differ): run the same "
                f"command again to finish it, or delete {parts} to start over"
            )
        return {int(p.stem.removeprefix("chunk_")) for p in parts.glob("chunk_*.zip") if _whole(p)}
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write(record, json.dumps(job, indent=2) + "\n")
    return set()


def _whole(path: Path) -> bool:
    """A chunk file that reads back whole (atomic writes leave no partial ones; this also catches a damaged disk)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None and CHUNK_MANIFEST in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _refuse_earlier_skips(parts: Path, done: set[int]) -> None:
    """Without skip_bad every image must be in the zip: chunks an earlier run wrote with skip_bad=true that left
    files out are not reused silently."""
    skipped = []
    for chunk in sorted(done):
        with zipfile.ZipFile(_chunk_path(parts, chunk)) as archive:
            skipped += json.loads(archive.read(CHUNK_MANIFEST))["skipped"]
    if skipped:
        raise DatasetError(
            f"an earlier run with skip_bad=true left {len(skipped)} unreadable file(s) out of {parts} (the first: "
            f"{skipped[0]}): finish with skip_bad=true, or delete {parts} to start over"
        )


def _encode(dataset: Dataset, parts: Path, todo: list[int], *, workers: int, skip_bad: bool, start: int) -> None:
    """Encode the images of the chunks `todo` in worker processes, writing each chunk when its last image arrives."""
    indices = [i for c in todo for i in range(c * CHUNK, c * CHUNK + _chunk_size(c, len(dataset)))]
    loader = DataLoader(EncodedImages(dataset), batch_size=None, sampler=indices, num_workers=workers)
    progress = Progress(what="prepared images", total=len(dataset), start=start)
    pending: dict[str, tuple[bytes, int]] = {}
    skipped: list[str] = []
    done, shown = start, time.perf_counter()
    try:
        for index, png, label, failure in loader:
            if failure is not None:
                if not skip_bad:
                    raise DatasetError(
                        f"cannot read image {failure}: replace or delete it, or run again with skip_bad=true to leave "
                        "unreadable files out (the images done so far are kept)"
                    )
                log.warning(f"left out unreadable image {failure}")
                skipped.append(failure)
            else:
                pending[member_name(index)] = (png, label)
            done += 1
            if (index + 1) % CHUNK == 0 or index + 1 == len(dataset):
                _write_chunk(_chunk_path(parts, index // CHUNK), pending, skipped)
                pending, skipped = {}, []
            if time.perf_counter() - shown > 5 or done == len(dataset):
                progress.update(done)
                shown = time.perf_counter()
    except Exception as error:
        reraise_worker_error(error)
    finally:
        progress.close()


def _write_chunk(path: Path, images: dict[str, tuple[bytes, int]], skipped: list[str]) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNG is compressed already
        for name, (png, _) in images.items():
            archive.writestr(name, png)
        labels = [[name, label] for name, (_, label) in images.items()]
        archive.writestr(CHUNK_MANIFEST, json.dumps({"labels": labels, "skipped": skipped}))
    atomic_write(path, buffer.getvalue())


def _merge(parts: Path, chunk_files: list[Path], out: Path, *, classes: list[str]) -> Prepared:
    """Copy every chunk's images into `out`, with the dataset.json of all their labels, atomically."""
    needed = sum(p.stat().st_size for p in chunk_files)
    labels, skipped = [], []
    out.parent.mkdir(parents=True, exist_ok=True)
    with space_for(out, needed), atomic_file(out) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as target:
        for chunk in chunk_files:
            with zipfile.ZipFile(chunk) as source:
                record = json.loads(source.read(CHUNK_MANIFEST))
                for name, label in record["labels"]:
                    target.writestr(name, source.read(name))
                    labels.append([name, label])
                skipped += record["skipped"]
        manifest = {"labels": labels if classes else None, "classes": classes if classes else None}
        target.writestr(MANIFEST, json.dumps(manifest))
    return Prepared(out, images=len(labels), skipped=skipped)
