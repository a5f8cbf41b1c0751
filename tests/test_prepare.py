"""sagan-prepare: the training path's pixels in a zip of PNGs with StyleGAN2-ADA's dataset.json, resumable."""

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

import sagan.prepare
from conftest import compose_config, run_command
from sagan.cli import parse_args, usage
from sagan.data import preparation
from sagan.data.batch_stream import BatchStream
from sagan.data.dataset_base import DatasetError
from sagan.data.datasets import build_dataset, training_dataset
from sagan.data.torchvision_sets import TorchvisionImages
from sagan.prepare import PrepareArgs, prepare_dataset
from sagan.utils.directory_lock import lock_directory
from sagan.utils.errors import UserError


def noise(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def class_tree(root: Path, per_class: int = 5) -> Path:
    """Two classes of JPEG, PNG and greyscale images of several sizes, most not square and none at 16 px."""
    for k, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (40 + 7 * i, 30 + 3 * k)  # (width, height)
            image = noise(size[1], size[0], seed=10 * k + i, mode="L" if i == 3 else "RGB")
            image.save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def run(*argv: str) -> preparation.Prepared:
    return prepare_dataset(parse_args(PrepareArgs, list(argv)))


def test_the_zip_holds_the_training_pixels_and_labels_in_stylegan2_ada_layout(tmp_path):
    src = class_tree(tmp_path / "src")
    prepared = run(f"src={src}", f"out={tmp_path / 'out.zip'}", "resolution=16", "workers=2")
    assert prepared.images == 10 and not prepared.skipped and not (tmp_path / "out.zip.parts").exists()
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        manifest = json.loads(archive.read("dataset.json"))
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        assert names == [f"00000/img{i:08d}.png" for i in range(10)]  # StyleGAN2-ADA's dataset_tool names
        assert dict(manifest["labels"]) == {name: i // 5 for i, name in enumerate(names)} and manifest["classes"] == ["cat", "dog"]
        for name in names:
            with Image.open(io.BytesIO(archive.read(name))) as image:
                assert image.size == (16, 16) and image.mode == "RGB"
    source = build_dataset("folder", root=str(src), resolution=16)
    again = build_dataset("folder", root=str(tmp_path / "out.zip"), resolution=16)
    assert again.classes == source.classes and again.all_labels() == source.all_labels()
    for i in range(10):  # the same pixels: the source's path decoded, cropped and resized them; the zip is lossless
        assert torch.equal(again[i][0], source[i][0])


def test_training_on_the_prepared_zip_sees_the_batches_of_the_source(tmp_path):
    src = class_tree(tmp_path / "src")
    run(f"src={src}", f"out={tmp_path / 'out.zip'}", "resolution=32", "workers=0")
    streams = []
    for root in (src, tmp_path / "out.zip"):
        config = OmegaConf.to_container(compose_config("data=folder", f"data.root={root}", "model.conditional=true"))
        dataset = training_dataset(config, resolution=32, labels=True)
        streams.append(iter(BatchStream(dataset, batch_size=4, seed=3, hflip=True, num_workers=0)))
    for _ in range(5):  # more than an epoch, flips included
        (a, ya), (b, yb) = next(streams[0]), next(streams[1])
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_a_stylegan2_ada_zip_is_labelled_by_its_dataset_json(tmp_path):
    """Its images sit in folders of 1,000 (00000/, 00001/): classes come from dataset.json, never from those."""
    archive_path = tmp_path / "ada.zip"
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in (0, 1, 1000, 1001)]
    with zipfile.ZipFile(archive_path, "w") as archive:
        for i, name in enumerate(names):
            buffer = io.BytesIO()
            noise(8, 8, seed=i).save(buffer, format="PNG")
            archive.writestr(name, buffer.getvalue())
        archive.writestr("dataset.json", json.dumps({"labels": [[n, y] for n, y in zip(names, [4, 0, 4, 2])]}))
    dataset = build_dataset("folder", root=str(archive_path), resolution=8)
    assert dataset.all_labels() == [4, 0, 4, 2] and dataset.num_classes == 5 and dataset.classes == ["0", "1", "2", "3", "4"]
    assert build_dataset("folder", root=str(archive_path), resolution=8, labels=False).num_classes == 0
    unlabelled = tmp_path / "unlabelled"  # a folder works as a zip does
    (unlabelled / "00000").mkdir(parents=True)
    noise(8, 8, 0).save(unlabelled / "00000" / "img00000000.png")
    (unlabelled / "dataset.json").write_text(json.dumps({"labels": None}))
    assert build_dataset("folder", root=str(unlabelled), resolution=8).num_classes == 0
    (unlabelled / "dataset.json").write_text(json.dumps({"labels": [["00000/other.png", 1]]}))
    with pytest.raises(DatasetError, match=r"has no label for '00000/img00000000.png' \(1 of 1 images\)"):
        build_dataset("folder", root=str(unlabelled), resolution=8)
    (unlabelled / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", [0.5, 0.5]]]}))
    with pytest.raises(DatasetError, match="must be class indices"):
        build_dataset("folder", root=str(unlabelled), resolution=8)


def test_an_interrupted_preparation_continues_and_bad_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "CHUNK", 3)
    src = class_tree(tmp_path / "src")
    (src / "dog" / "2.png").write_bytes(b"not a png")  # image 7 of 10: chunks 0 and 1 finish before it
    out = tmp_path / "out.zip"
    out.write_bytes(b"an older file")  # a failed run leaves it as it was
    with pytest.raises(DatasetError, match=r"cannot read image .*dog/2.png .* run again with skip_bad=true") as error:
        run(f"src={src}", f"out={out}", "resolution=16", "workers=0")
    assert "\n" not in str(error.value) and out.read_bytes() == b"an older file"
    parts = sorted(p.name for p in (tmp_path / "out.zip.parts").glob("chunk_*.zip"))
    assert parts == ["chunk_000000.zip", "chunk_000001.zip"]
    with pytest.raises(DatasetError, match=r"holds an unfinished preparation with other settings \(resolution differ\)"):
        run(f"src={src}", f"out={out}", "resolution=8", "workers=0")
    encoded, encode = [], preparation.encode_png
    monkeypatch.setattr(preparation, "encode_png", lambda image: encoded.append(1) or encode(image))
    prepared = run(f"src={src}", f"out={out}", "resolution=16", "workers=0", "skip_bad=true")
    assert prepared.reused_chunks == 2 and len(encoded) == 10 - 6 - 1  # only the rest was done again
    assert prepared.images == 9 and len(prepared.skipped) == 1 and "dog/2.png" in prepared.skipped[0]
    with zipfile.ZipFile(out) as archive:
        labels = dict(json.loads(archive.read("dataset.json"))["labels"])
    assert len(labels) == 9 and "00000/img00000007.png" not in labels
    source = build_dataset("folder", root=str(src), resolution=16, skip_bad=True)
    again = build_dataset("folder", root=str(out), resolution=16)
    kept = [i for i in range(10) if i != 7]
    assert all(torch.equal(again[j][0], source[i][0]) and again[j][1] == source[i][1] for j, i in enumerate(kept))
    assert not (tmp_path / "out.zip.parts").exists()


class KilledAt(Dataset):
    """A source whose run is killed when it reaches image `at` (None: not killed)."""

    def __init__(self, dataset, at):
        self.dataset, self.at, self.classes = dataset, at, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index == self.at:
            raise KeyboardInterrupt
        return self.dataset[index]

    def where(self, index):
        return self.dataset.where(index)


def test_chunks_that_left_files_out_are_not_reused_without_skip_bad(tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "CHUNK", 3)
    src = class_tree(tmp_path / "src")
    (src / "cat" / "1.jpg").write_bytes(b"not a jpeg")  # image 1: in chunk 0
    source = build_dataset("folder", root=str(src), resolution=16)  # as sagan-prepare builds it: failures reach it
    out, job = tmp_path / "out.zip", {"source": str(src), "resolution": 16}
    with pytest.raises(KeyboardInterrupt):  # killed after chunk 0, written with image 1 left out
        preparation.prepare(KilledAt(source, 4), out, job=job, workers=0, skip_bad=True)
    with pytest.raises(DatasetError, match=r"skip_bad=true left 1 unreadable file\(s\) out .*cat/1.jpg.*finish with skip_bad=true"):
        preparation.prepare(KilledAt(source, None), out, job=job, workers=0, skip_bad=False)
    prepared = preparation.prepare(KilledAt(source, None), out, job=job, workers=0, skip_bad=True)
    assert prepared.reused_chunks == 1 and prepared.images == 9 and "cat/1.jpg" in prepared.skipped[0]


def test_a_second_preparation_of_the_same_zip_is_refused_while_the_first_runs(tmp_path):
    src = class_tree(tmp_path / "src", per_class=2)
    out = tmp_path / "out.zip"
    holder = lock_directory(tmp_path / "out.zip.parts")  # the first run, working
    try:
        with pytest.raises(DatasetError, match=rf"{out} is being prepared by pid {os.getpid()} on .*wait for it"):
            run(f"src={src}", f"out={out}", "resolution=16", "workers=0")
    finally:
        os.close(holder)
    assert run(f"src={src}", f"out={out}", "resolution=16", "workers=0").images == 4  # free once it ended


def test_the_zip_is_not_written_inside_its_source(tmp_path):
    src = class_tree(tmp_path / "src", per_class=2)
    with pytest.raises(UserError, match="is inside the source folder"):
        run(f"src={src}", f"out={src / 'cat' / 'p.zip'}", "resolution=16")
    assert not (src / "cat" / "p.zip.parts").exists()


def test_rewriting_dataset_json_changes_what_the_folder_is(tmp_path):
    root = tmp_path / "ada"
    (root / "00000").mkdir(parents=True)
    noise(8, 8, 0).save(root / "00000" / "img00000000.png")
    manifest = root / "dataset.json"
    manifest.write_text(json.dumps({"labels": [["00000/img00000000.png", 0]]}))
    before = build_dataset("folder", root=str(root), resolution=8).identity()
    manifest.write_text(json.dumps({"labels": [["00000/img00000000.png", 1]]}))  # in place: the folder's time stays
    os.utime(manifest, (manifest.stat().st_atime, manifest.stat().st_mtime + 10))  # as an edit a while later
    assert build_dataset("folder", root=str(root), resolution=8).identity() != before


def test_a_torchvision_dataset_is_prepared_with_its_class_names(tmp_path):
    base = [(noise(20, 24, seed=i), i % 3) for i in range(7)]
    dataset = TorchvisionImages(base, resolution=16, classes=["a", "b", "c"], name="fake", split="train")
    job = {"source": "fake", "resolution": 16}
    prepared = preparation.prepare(dataset, tmp_path / "t.zip", job=job, workers=0, skip_bad=False)
    again = build_dataset("folder", root=str(tmp_path / "t.zip"), resolution=16)
    assert prepared.images == 7 and again.classes == ["a", "b", "c"] and again.all_labels() == [i % 3 for i in range(7)]
    assert all(torch.equal(again[i][0], dataset[i][0]) for i in range(7))


@pytest.mark.parametrize("argv, message", [
    (["src=demo", "out=x.tar", "resolution=32"], "must name a .zip file"),
    (["src=nowhere", "out=x.zip", "resolution=32"], "'nowhere' is neither an existing folder or .zip nor a known dataset"),
    (["src=demo", "out=x.zip", "resolution=2"], "resolution must be at least 4"),
    (["src=demo", "out=x.zip", "resolution=32", "workers=-1"], "workers must be >= 0"),
])  # fmt: skip
def test_bad_arguments_are_one_line(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        run(*argv)
    assert not list(tmp_path.iterdir())  # nothing written


def test_sagan_prepare_command(tmp_path, monkeypatch, capsys):
    code, out, _ = run_command("prepare", ["--help"], monkeypatch, capsys)
    assert code == 0 and "sagan-prepare src=" in out and "skip_bad" in out
    src = class_tree(tmp_path / "src", per_class=2)
    code, out, err = run_command("prepare", [f"src={src}", f"out={tmp_path / 'p.zip'}", "resolution=16"], monkeypatch, capsys)
    assert code == 0 and "4 images written to" in out and "prepared images 4/4" in err
    code, _, err = run_command("prepare", [f"src={src}", "out=p.tar", "resolution=16"], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and "must name a .zip file" in err


def test_default_workers_are_the_loaders_one_per_cpu_at_most_8(tmp_path, monkeypatch):
    """A 64-CPU node starts 8 workers, as training's loader would (more rarely help, and each holds memory); an
    explicit workers= still wins; the help says so."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    started: list[int] = []

    class Started(Exception):
        pass

    def prepare(dataset, out, *, job, workers, skip_bad):
        started.append(workers)
        raise Started  # the count is all this test needs: stop before any work

    monkeypatch.setattr(sagan.prepare, "prepare", prepare)
    for workers in ([], ["workers=12"], ["workers=0"]):
        with pytest.raises(Started):
            run("src=demo", f"out={tmp_path / 'p.zip'}", "resolution=8", *workers)
    assert started == [8, 12, 0]
    assert "one per CPU, at most 8" in usage(PrepareArgs, "")
