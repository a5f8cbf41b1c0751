"""Datasets and the resumable batch stream: tiny generated images, CPU, seconds."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from sagan.data.batch_stream import BatchStream
from sagan.data.dataset_base import DatasetError
from sagan.data.datasets import ClassImages, build_dataset, with_fraction
from sagan.data.torchvision_sets import TorchvisionImages
from sagan.data.demo import MirrorShapes, mirror_consistency
from sagan.utils.errors import UserError

R = 16


def _noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _make_tree(root: Path) -> None:
    """Two classes with mixed formats, modes and sizes, plus files that must be ignored."""
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "nested").mkdir(parents=True)
    Image.fromarray(_noise(20, 20, 0)).save(root / "cat" / "a.png")
    Image.fromarray(_noise(30, 24, 1, channels=1)).save(root / "cat" / "b_grey.jpg")  # L, non-square
    Image.fromarray(_noise(24, 24, 2, channels=4)).save(root / "dog" / "c_rgba.PNG")  # RGBA, upper-case extension
    Image.fromarray(_noise(40, 18, 3)).save(root / "dog" / "nested" / "d.bmp")  # non-square, one level deeper
    Image.fromarray(_noise(16, 16, 4)).convert("P").save(root / "dog" / "e_palette.gif")
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.fromarray(_noise(8, 8, 5)).save(root / "dog" / ".hidden.png")


def _zip_tree(root: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())


# ---------------------------------------------------------------------------------------------------------------------
# Folders and zips


def test_folder_and_zip_give_identical_items(tmp_path: Path) -> None:
    _make_tree(tmp_path / "tree")
    _zip_tree(tmp_path / "tree", tmp_path / "tree.zip")
    folder = build_dataset("folder", root=str(tmp_path / "tree"), resolution=R)
    archive = build_dataset("folder", root=str(tmp_path / "tree.zip"), resolution=R)

    assert folder.files == ["cat/a.png", "cat/b_grey.jpg", "dog/c_rgba.PNG", "dog/e_palette.gif", "dog/nested/d.bmp"]
    assert folder.classes == archive.classes == ["cat", "dog"]
    assert folder.num_classes == archive.num_classes == 2
    assert len(folder) == len(archive) == 5
    for i in range(len(folder)):
        (x, y), (x_zip, y_zip) = folder[i], archive[i]
        assert x.dtype == torch.uint8 and x.shape == (3, R, R)
        assert torch.equal(x, x_zip)
        assert y == y_zip == (0 if i < 2 else 1)
    grey, _ = folder[1]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # L -> RGB repeats the channel


def test_non_square_images_are_center_cropped(tmp_path: Path) -> None:
    # Red | green | blue thirds: only the green centre square survives the crop.
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :20, 0] = pixels[:, 20:40, 1] = pixels[:, 40:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x, y = build_dataset("folder", root=str(tmp_path), resolution=8)[0]
    assert x.shape == (3, 8, 8) and y == 0
    assert (x[1] >= 254).all() and (x[0] <= 1).all() and (x[2] <= 1).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 128 * 256, dtype=np.uint16)).save(tmp_path / "deep.png")
    x, _ = build_dataset("folder", root=str(tmp_path), resolution=8)[0]
    assert (x == 128).all()


def test_labels_come_from_subfolders_only(tmp_path: Path) -> None:
    _make_tree(tmp_path / "tree")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(_noise(8, 8, i)).save(flat / f"{i}.png")

    unlabeled = build_dataset("folder", root=str(flat), resolution=R)
    assert unlabeled.num_classes == 0 and [unlabeled[i][1] for i in range(3)] == [0, 0, 0]
    no_labels = build_dataset("folder", root=str(tmp_path / "tree"), resolution=R, labels=False)
    assert no_labels.num_classes == 0 and {no_labels[i][1] for i in range(len(no_labels))} == {0}

    Image.fromarray(_noise(8, 8, 9)).save(tmp_path / "tree" / "stray.png")
    with pytest.raises(DatasetError, match="model.conditional=false"):
        build_dataset("folder", root=str(tmp_path / "tree"), resolution=R)


def test_zip_under_one_top_folder_is_one_class(tmp_path: Path) -> None:
    _make_tree(tmp_path / "top")
    with zipfile.ZipFile(tmp_path / "top.zip", "w") as zf:
        for path in sorted((tmp_path / "top").rglob("*")):
            if path.is_file():
                zf.write(path, "top/" + path.relative_to(tmp_path / "top").as_posix())
    archive = build_dataset("folder", root=str(tmp_path / "top.zip"), resolution=R)
    assert archive.classes == ["top"] and len(archive) == 5


def test_zip_dataset_works_in_dataloader_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_tree(tmp_path / "tree")
    _zip_tree(tmp_path / "tree", tmp_path / "tree.zip")
    archive = build_dataset("folder", root=str(tmp_path / "tree.zip"), resolution=R)
    first, _ = archive[0]  # opens the archive in this process
    copy = pickle.loads(pickle.dumps(archive))  # what spawn-started workers receive: open files do not pickle
    assert torch.equal(copy[0][0], first)
    handle = archive._zip()
    with monkeypatch.context() as patch:
        patch.setattr(os, "getpid", lambda: -1)  # as in a forked worker: the parent's handle must not be reused
        assert archive._zip() is not handle
    serial = BatchStream(archive, batch_size=2, seed=3)
    parallel = BatchStream(archive, batch_size=2, seed=3, num_workers=2)
    for _ in range(5):
        (x, y), (x_par, y_par) = next(serial), next(parallel)
        assert torch.equal(x, x_par) and torch.equal(y, y_par)


def test_configuration_errors_name_the_problem(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(DatasetError, match=f"'{missing}' does not exist"):
        build_dataset("folder", root=str(missing), resolution=R)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=f"no images found under '{tmp_path / 'empty'}'"):
        build_dataset("folder", root=str(tmp_path / "empty"), resolution=R)
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet7'.*cifar10.*folder.*demo"):
        build_dataset("imagenet7", root=None, resolution=R)
    with pytest.raises(DatasetError, match="data.root is not set"):
        build_dataset("folder", root=None, resolution=R)
    with pytest.raises(DatasetError, match=f"data.root '{missing}' does not exist.*data.download=true"):
        build_dataset("cifar10", root=str(missing), resolution=32)
    with pytest.raises(DatasetError, match="'validation' is not a split of cifar10"):
        build_dataset("cifar10", root=str(tmp_path), resolution=32, split="validation")


@pytest.mark.parametrize("as_zip", [False, True])
def test_bad_images_raise_or_are_skipped(tmp_path: Path, as_zip: bool, caplog: pytest.LogCaptureFixture) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(3):
        Image.fromarray(_noise(32, 32, i)).save(tree / f"{i}.png")
    payload = (tree / "1.png").read_bytes()
    (tree / "1.png").write_bytes(payload[: len(payload) // 2])  # truncated mid-stream
    (tree / "3.jpg").write_bytes(b"not a jpeg")
    root = tmp_path / "tree.zip" if as_zip else tree
    if as_zip:
        _zip_tree(tree, root)

    strict = build_dataset("folder", root=str(root), resolution=R)
    assert torch.equal(strict[0][0], build_dataset("folder", root=str(root), resolution=R, skip_bad=True)[0][0])
    with pytest.raises(DatasetError, match=r"1\.png.*data\.skip_bad=true"):
        strict[1]
    with pytest.raises(DatasetError, match=r"3\.jpg"):
        strict[3]

    lenient = build_dataset("folder", root=str(root), resolution=R, skip_bad=True)
    assert torch.equal(lenient[1][0], strict[2][0])  # the next readable image stands in
    assert lenient.num_bad == 1
    assert "skipped unreadable image" in caplog.text and "1.png" in caplog.text  # named and counted in the log
    assert torch.equal(lenient[3][0], strict[0][0])  # wraps around at the end
    lenient[1]
    assert lenient.num_bad == 2  # distinct files, not occurrences


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels (no pixel data): what PIL checks before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.mark.parametrize("in_memory", [False, True])
def test_errors_in_loader_workers_read_like_any_other_error(tmp_path: Path, in_memory: bool) -> None:
    """A 20000x20000 image (PIL's decompression-bomb guard refuses it) read by a DataLoader worker: the error is ours,
    one line, not the worker's traceback."""
    for i in range(3):
        Image.fromarray(_noise(32, 32, i)).save(tmp_path / f"{i}.png")
    _png_header_only(tmp_path / "3_huge.png", 20000, 20000)
    dataset = build_dataset("folder", root=str(tmp_path), resolution=R, labels=False)
    with pytest.raises(DatasetError) as error:
        stream = BatchStream(dataset, batch_size=4, seed=0, in_memory=in_memory, num_workers=1)
        next(stream)
    message = str(error.value)
    assert message.startswith("cannot read image") and "3_huge.png" in message and "data.skip_bad=true" in message
    assert "DecompressionBombError" in message
    assert "\n" not in message and "Traceback" not in message and len(message) < 400, message


def test_torchvision_wrapper_crops_resizes_and_labels() -> None:
    base = [(Image.fromarray(_noise(24, 32, i)), i % 3) for i in range(4)]
    labeled = TorchvisionImages(base, resolution=R, classes=["a", "b", "c"], name="fake", split="train")
    x, y = labeled[2]
    assert x.shape == (3, R, R) and x.dtype == torch.uint8 and y == 2
    unlabeled = TorchvisionImages(base, resolution=R, classes=[], name="fake", split="train")
    assert unlabeled.num_classes == 0 and unlabeled[2][1] == 0


# ---------------------------------------------------------------------------------------------------------------------
# The demo dataset


def test_demo_is_deterministic_symmetric_and_labelled() -> None:
    demo = build_dataset("demo", root=None, resolution=32, size=60, seed=5)
    again = build_dataset("demo", root=None, resolution=32, size=60, seed=5)
    other_seed = build_dataset("demo", root=None, resolution=32, size=60, seed=6)
    assert len(demo) == 60 and demo.num_classes == 3 and demo.classes == ["circle", "square", "triangle"]

    items = [demo[i] for i in range(60)]
    for i, (x, y) in enumerate(items):
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
        assert torch.equal(x, x.flip(-1))  # exactly mirror symmetric
        assert torch.equal(x, again[i][0]) and y == again[i][1]
        assert x.max() >= 200 and x.amin(dim=(1, 2)).max() <= 40  # a saturated shape on a dark background
    assert not any(torch.equal(items[i][0], items[i + 1][0]) for i in range(59))
    assert sum(torch.equal(items[i][0], other_seed[i][0]) for i in range(60)) == 0
    assert {y for _, y in items} == {0, 1, 2}
    with pytest.raises(IndexError):
        demo[60]
    assert build_dataset("demo", root=None, resolution=32, labels=False)[0][1] == 0


def test_every_dataset_lists_its_labels_as_its_items_carry_them(tmp_path: Path) -> None:
    """all_labels() (what intra-FID splits a reference by) without decoding images, equal to the items' labels."""
    _make_tree(tmp_path / "tree")
    base = [(Image.fromarray(_noise(8, 8, i)), i % 3) for i in range(6)]

    class Targets(list):  # torchvision keeps the labels beside the images, as `targets` (or `labels`)
        targets = [i % 3 for i in range(6)]

    datasets = [
        build_dataset("demo", root=None, resolution=32, size=40, seed=2),
        with_fraction(build_dataset("demo", root=None, resolution=32, size=40, seed=2), 0.5),
        build_dataset("folder", root=str(tmp_path / "tree"), resolution=R),
        TorchvisionImages(Targets(base), resolution=R, classes=["a", "b", "c"], name="fake", split="train"),
    ]
    for dataset in datasets:
        assert dataset.all_labels() == [dataset[i][1] for i in range(len(dataset))]
        assert len(set(dataset.all_labels())) > 1
    one = ClassImages(datasets[0], 1)
    assert len(one) == datasets[0].all_labels().count(1) and all(y == 1 for _, y in (one[i] for i in range(len(one))))


def test_demo_scales_with_resolution() -> None:
    # Same scene at any resolution: the 64 px image box-filtered down matches the 32 px one closely.
    small, _ = MirrorShapes(resolution=32, seed=1)[7]
    large, _ = MirrorShapes(resolution=64, seed=1)[7]
    down = torch.nn.functional.avg_pool2d(large.float()[None], 2)[0]
    assert (down - small.float()).abs().mean() < 4
    assert torch.equal(large, large.flip(-1))


def test_mirror_consistency_separates_symmetry_from_chance() -> None:
    demo = MirrorShapes(resolution=32, seed=2)
    real = torch.stack([demo[i][0] for i in range(32)])
    assert mirror_consistency(real) == pytest.approx(1.0, abs=1e-4)
    assert mirror_consistency(real.float() / 127.5 - 1) == pytest.approx(mirror_consistency(real), abs=1e-6)

    # Left half of image i, right half of image i + 3: realistic halves, unrelated to each other.
    unrelated = real.clone()
    unrelated[..., 16:] = real.roll(3, dims=0)[..., 16:]
    assert abs(mirror_consistency(unrelated)) < 0.2

    noise = torch.randint(0, 256, (32, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert abs(mirror_consistency(noise)) < 0.05

    # An untrained generator: almost constant output. Its d_self is tiny, but so is d_other.
    flat = 0.1 + 0.01 * torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert abs(mirror_consistency(flat)) < 0.1
    assert mirror_consistency(torch.zeros(8, 3, 32, 32)) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# BatchStream


class Numbered(Dataset):
    """Item i: channel 0 holds i, channel 1 marks the left column, so both the index and a flip are visible."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.num_classes = 3

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.zeros(3, 4, 4, dtype=torch.uint8)
        x[0] = i
        x[1, :, 0] = 1
        return x, i % 3


def _ids(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].tolist()


def _take(stream: BatchStream, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(stream) for _ in range(k)]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b))


MODES = [
    pytest.param({"in_memory": True}, id="in_memory"),
    pytest.param({"num_workers": 0}, id="loader"),
    pytest.param({"num_workers": 2}, id="loader-2-workers"),
]


@pytest.mark.parametrize("mode", MODES)
def test_stream_is_seeded_and_covers_each_epoch(mode: dict) -> None:
    data = Numbered(22)  # 5 batches of 4 per epoch, 2 items dropped
    batches = _take(BatchStream(data, batch_size=4, seed=0, **mode), 10)
    assert _same(batches, _take(BatchStream(data, batch_size=4, seed=0, **mode), 10))
    assert not _same(batches, _take(BatchStream(data, batch_size=4, seed=1, **mode), 10))
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape == (4, 3, 4, 4)
        assert y.dtype == torch.int64 and y.tolist() == [i % 3 for i in _ids(x)]
    epochs = [sum((_ids(x) for x, _ in batches[e * 5 : e * 5 + 5]), []) for e in (0, 1)]
    for ids in epochs:
        assert len(set(ids)) == 20 and set(ids) <= set(range(22))  # each item at most once, the rest dropped
    assert epochs[0] != epochs[1]  # a fresh order every epoch


@pytest.mark.parametrize("mode", MODES)
def test_resume_is_exact(mode: dict) -> None:
    data = Numbered(20)  # 5 batches per epoch: the restart lands mid-epoch and the run crosses epochs
    straight = _take(BatchStream(data, batch_size=4, seed=7, hflip=True, **mode), 13)

    first = BatchStream(data, batch_size=4, seed=7, hflip=True, **mode)
    head = _take(first, 7)
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 2}  # counts batches returned, not batches the workers prefetched
    second = BatchStream(data, batch_size=4, seed=7, hflip=True, **mode)
    second.load_state_dict(state)
    assert _same(head + _take(second, 6), straight)

    # Rewinding a stream that is already running restarts its loader at the saved position.
    first.load_state_dict({"epoch": 0, "batch": 3})
    assert _same(_take(first, 4), straight[3:7])


def test_in_memory_and_loader_modes_agree() -> None:
    data = Numbered(20)
    kwargs = {"batch_size": 4, "seed": 3, "hflip": True}
    in_memory = _take(BatchStream(data, in_memory=True, **kwargs), 12)
    assert _same(in_memory, _take(BatchStream(data, **kwargs), 12))
    assert _same(in_memory, _take(BatchStream(data, num_workers=2, **kwargs), 12))


def test_two_ranks_equal_one_rank_with_twice_the_batch() -> None:
    data = Numbered(26)  # 3 global batches of 8 per epoch
    single = BatchStream(data, batch_size=8, seed=4, hflip=True)
    ranks = [BatchStream(data, batch_size=4, seed=4, hflip=True, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        x, y = next(single)
        (x0, y0), (x1, y1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0].state_dict() == single.state_dict() == {"epoch": 2, "batch": 1}


def test_hflip_mirrors_about_half_without_changing_the_order() -> None:
    data = Numbered(64)
    flipped = _take(BatchStream(data, batch_size=16, seed=9, hflip=True, in_memory=True), 16)
    plain = _take(BatchStream(data, batch_size=16, seed=9, in_memory=True), 16)
    assert _same(flipped, _take(BatchStream(data, batch_size=16, seed=9, hflip=True, in_memory=True), 16))
    count = 0
    for (x, y), (x_plain, y_plain) in zip(flipped, plain):
        assert _ids(x) == _ids(x_plain) and torch.equal(y, y_plain)
        is_flipped = x[:, 1, 0, 3] == 1  # the left-column marker moved to the right
        assert torch.equal(x[is_flipped], x_plain[is_flipped].flip(-1))
        assert torch.equal(x[~is_flipped], x_plain[~is_flipped])
        count += int(is_flipped.sum())
    assert 0.4 < count / (16 * 16) < 0.6
    # Flip bits are drawn per epoch: the same item is not always flipped the same way.
    first_epoch = {i: f for x, _ in flipped[:4] for i, f in zip(_ids(x), (x[:, 1, 0, 3] == 1).tolist())}
    second_epoch = {i: f for x, _ in flipped[4:8] for i, f in zip(_ids(x), (x[:, 1, 0, 3] == 1).tolist())}
    assert first_epoch != second_epoch


def test_stream_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for mode in ({"in_memory": True}, {"num_workers": 0}, {"num_workers": 2}):
        _take(BatchStream(Numbered(20), batch_size=4, seed=0, hflip=True, **mode), 6)
    assert torch.equal(torch.get_rng_state(), before)


def test_stream_rejects_too_small_datasets_and_bad_states() -> None:
    with pytest.raises(DatasetError, match="fewer than one global batch of 8"):
        BatchStream(Numbered(7), batch_size=4, seed=0, world_size=2)
    stream = BatchStream(Numbered(8), batch_size=4, seed=0)
    with pytest.raises(UserError, match="out of range"):
        stream.load_state_dict({"epoch": 0, "batch": 2})


@pytest.mark.skipif("SAGAN_CIFAR10_ZIP" not in os.environ, reason="needs SAGAN_CIFAR10_ZIP (the offline CIFAR-10 JPEG zip)")
def test_cifar10_jpeg_zip_loads_as_labelled_folder() -> None:
    dataset = build_dataset("folder", root=os.environ["SAGAN_CIFAR10_ZIP"], resolution=32)
    assert len(dataset) == 50_000
    assert dataset.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    labels = torch.tensor(dataset.labels)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 5_000))
    image, label = dataset[12_345]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == labels[12_345]
    assert image.float().std() > 10  # a real photo, not a blank
