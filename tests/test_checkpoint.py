import os

import pytest
import torch

from sagan.checkpoint import CheckpointError, atomic_write, find_latest, load_checkpoint, save_checkpoint


class Payload:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_and_latest(tmp_path):
    state = {"trainer": {"w": torch.arange(3.0), "step": 7}, "config": {"a": [1, 2]}}
    save_checkpoint(state, tmp_path, step=7, keep_last=2)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["trainer"]["w"], torch.arange(3.0)) and loaded["config"] == {"a": [1, 2]}
    assert find_latest(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "last.pt").unlink()
    save_checkpoint(state, tmp_path, step=12, keep_last=2)
    (tmp_path / "last.pt").unlink()
    assert find_latest(tmp_path) == tmp_path / "step_0000012.pt"  # the highest step, not the newest name
    assert find_latest(tmp_path / "missing") is None


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "sagan-checkpoint-v1", "x": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load .*unsupported GLOBAL"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_corrupt_and_foreign_files(tmp_path):
    save_checkpoint({"w": torch.randn(1000)}, tmp_path, step=1, keep_last=0)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "noise.pt").write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "noise.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a sagan checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_write(path, b"old")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
