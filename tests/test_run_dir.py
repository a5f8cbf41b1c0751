"""One writer per run directory, and a full disk that loses nothing: a second trainer on a live run is refused before
any work, a killed holder does not block the next start, a filesystem without locks is reported, and running out of
space while writing a checkpoint, images or metrics.jsonl stops the run in one line with the last good checkpoint
whole, from which train.resume=auto continues (through a mocked ENOSPC for every file; for a checkpoint also through
the kernel's own, /dev/full, and on a small tmpfs where mounting is allowed)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sagan.training import assembly, run_lock
from sagan.utils import directory_lock
from sagan.utils.atomic_files import DiskFull, atomic_write, space_for
from sagan.checkpoint import load_checkpoint
from sagan.cli import one_line
from sagan.training.run_logger import RunLogger
from sagan.training.loop import train
from test_robustness import logged_step, start, wait_for


def logged_once(run_dir: Path) -> list[int]:
    """The steps with a loss row in metrics.jsonl, after checking that no row is there twice (the same step and keys)
    and that steps never go back."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(row["step"], tuple(sorted(row))) for row in rows]
    assert len(keys) == len(set(keys)), "a row is there twice"
    assert [row["step"] for row in rows] == sorted(row["step"] for row in rows)
    return [row["step"] for row in rows if "loss/d" in row]


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_and_the_first_goes_on(tmp_path):
    run = tmp_path / "run"
    first = start(run, "train.steps=100000", "train.ckpt_every=2", "train.resume=auto")
    wait_for(lambda: logged_step(run) >= 2)
    record = (run / ".hydra" / "overrides.yaml").read_text()
    second = subprocess.run(
        [sys.executable, "-m", "sagan.train", "experiment=demo", "model.g_ch=8", "model.d_ch=8", "data.size=64",
         "train.batch_size=8", "logger.mode=disabled", f"hydra.run.dir={run}", "train.resume=auto", "train.steps=7"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run directory {run.resolve()} is in use by pid {first.pid} on ")
    assert "since" in lines[0]
    assert (run / ".hydra" / "overrides.yaml").read_text() == record  # the refused trainer wrote nothing there
    assert first.poll() is None  # the first one is unaffected...
    reached = logged_step(run)
    wait_for(lambda: logged_step(run) >= reached + 2)  # ... and keeps training
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    steps = logged_once(run)
    assert steps == list(range(1, steps[-1] + 1))  # every step once


@pytest.mark.slow
def test_a_killed_holder_does_not_block_the_next_start(tmp_path):
    run = tmp_path / "run"
    holder = start(run, "train.steps=100000", "train.ckpt_every=2")
    wait_for(lambda: (run / "checkpoints" / "last.pt").exists() and logged_step(run) >= 3)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    step = load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"]
    resumed = start(run, f"train.steps={step + 1}", "train.resume=auto")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == step + 1
    assert json.loads((run / directory_lock.LOCK_FILE).read_text())["pid"] == resumed.pid  # the last holder, named


def test_the_lock_is_held_for_the_run_and_released_after_it(tiny_cfg, tmp_path, monkeypatch):
    seen = []
    original = RunLogger.log_scalars

    def log_scalars(self, step, scalars):  # while training: another process cannot take the lock
        if not seen:
            probe = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
            seen.append(subprocess.run([sys.executable, "-c", probe, str(tmp_path / directory_lock.LOCK_FILE)], capture_output=True).returncode)
        original(self, step, scalars)

    monkeypatch.setattr(RunLogger, "log_scalars", log_scalars)
    train(tiny_cfg("train.steps=2"), tmp_path)
    assert seen == [1]
    fd = os.open(tmp_path / directory_lock.LOCK_FILE, os.O_RDWR)  # after it: free
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_a_filesystem_without_locks_is_reported_not_ignored(tiny_cfg, tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(directory_lock.fcntl, "flock", no_locks)
    with pytest.raises(run_lock.RunLocked, match=r"cannot lock run directory .*no file locks.*train.lock=false"):
        train(tiny_cfg("train.steps=1"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert train(tiny_cfg("train.steps=1", "train.lock=false"), tmp_path / "run")["step"] == 1


class FullDisk:
    """os.fsync (atomic writes) or metrics.jsonl writes failing with ENOSPC for files whose name contains `name`."""

    def __init__(self, monkeypatch, name: str) -> None:
        self.name, self.hits = name, 0
        real_fsync = os.fsync

        def fsync(fd):
            if self.name in os.readlink(f"/proc/self/fd/{fd}"):
                self.hits += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        real_init = RunLogger.__init__
        disk = self

        def init(logger, *args, **kwargs):
            real_init(logger, *args, **kwargs)
            if disk.name == "metrics.jsonl":
                logger.metrics = FailingFile(logger.metrics, disk)

        monkeypatch.setattr(RunLogger, "__init__", init)


class FailingFile:
    def __init__(self, f, disk: FullDisk) -> None:
        self.f, self.disk, self.writes = f, disk, 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes >= 3:  # the first rows fit
            self.disk.hits += 1
            self.f.write(text[: len(text) // 2])  # a row cut short, as a full disk leaves it
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize(
    "name, where",
    [("step_0000004.pt", "checkpoints/step_0000004.pt"), ("last.pt", "checkpoints/last.pt"),
     ("step_0000004.png", "samples/step_0000004.png"), ("metrics.jsonl", "metrics.jsonl")],
    ids=["checkpoint", "last_pt", "sample_grid", "metrics_jsonl"],
)  # fmt: skip
def test_a_full_disk_stops_in_one_line_and_loses_nothing(name, where, tiny_cfg, tmp_path, monkeypatch):
    overrides = ["train.ckpt_every=2", "logger.image_every=4", "logger.log_every=1"]
    train(tiny_cfg("train.steps=2", *overrides), tmp_path)
    good = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with monkeypatch.context() as patch:
        disk = FullDisk(patch, name)
        with pytest.raises(DiskFull) as error:
            train(tiny_cfg("train.steps=6", "train.resume=auto", *overrides), tmp_path)
    assert disk.hits == 1
    message = one_line(error.value)
    assert message == str(error.value) and "\n" not in message
    assert f"no space left on the device writing {tmp_path / where}: it needs " in message and " are free " in message
    assert f"hydra.run.dir={tmp_path} train.resume=auto" in message
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == good  # the last good checkpoint, untouched
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]["step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")) and not list(tmp_path.rglob(".*.png.*.tmp"))
    # Space again: the same command continues from the last good checkpoint to the end, one metrics row per step.
    assert train(tiny_cfg("train.steps=6", "train.resume=auto", *overrides), tmp_path)["step"] == 6
    assert logged_once(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_space_for_names_the_file_and_the_space(tmp_path):
    with pytest.raises(DiskFull, match=r"writing .*x\.bin: it needs 3\.0 MiB, .* are free \(no space left on device\)"):
        with space_for(tmp_path / "x.bin", 3 * 2**20):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):  # other errors pass through as they are
        with space_for(tmp_path / "x.bin", 1):
            raise PermissionError(errno.EACCES, "denied")
    atomic_write(tmp_path / "y.txt", "text")
    assert (tmp_path / "y.txt").read_text() == "text"


@pytest.mark.slow
def test_a_real_full_disk_on_a_small_tmpfs(tmp_path):
    """On a real filesystem: a tmpfs with room for one checkpoint set, not two."""
    run = tmp_path / "run"
    run.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(run)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        assert start(run, "train.steps=2", "train.ckpt_every=2").wait(timeout=300) == 0
        size = (run / "checkpoints" / "last.pt").stat().st_size
        free = shutil.disk_usage(run).free
        with open(run / "filler", "wb") as f:  # leave room for half a checkpoint
            f.write(b"\0" * max(free - size // 2, 0))
        full = start(run, "train.steps=4", "train.ckpt_every=2", "train.resume=auto")
        out, _ = full.communicate(timeout=300)
        assert full.returncode == 1, out
        error = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and "no space left on the device writing" in error[0] and "checkpoints/step_0000004.pt" in error[0]
        assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2
        (run / "filler").unlink()
        resumed = start(run, "train.steps=4", "train.ckpt_every=2", "train.resume=auto")
        out, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, out
        assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 4
    finally:
        subprocess.run(["umount", "-l", str(run)], capture_output=True)


def test_a_real_full_disk_through_dev_full(tiny_cfg, tmp_path, monkeypatch):
    """A real ENOSPC from the kernel, with no mock of the writes and no mount: the temporary file the checkpoint
    writer writes step 4 through (`.<name>.<pid>.tmp` beside it, sagan.utils.atomic_files) is a symlink to /dev/full,
    whose every write fails with ENOSPC. The run stops in one line naming the checkpoint, the last good one is
    untouched and loads, no temporary file (nor the link) is left, and with space again the same command continues.

    The link is planted right after the run's start-up cleanup (checkpoint.remove_partial, which deletes what a killed
    run left, links included: checked here too), the only thing wrapped."""
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full here (Linux's device that fails every write with ENOSPC)")
    ckpts = tmp_path / "checkpoints"
    train(tiny_cfg("train.steps=2", "train.ckpt_every=2"), tmp_path)
    good = (ckpts / "last.pt").read_bytes()
    target = ckpts / "step_0000004.pt"
    link = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    real_remove_partial = assembly.remove_partial

    def remove_partial_then_plant(ckpt_dir: Path) -> None:
        link.symlink_to("/dev/full")
        real_remove_partial(ckpt_dir)
        assert not link.is_symlink()  # a link left by a killed run is cleaned up like any temporary file
        link.symlink_to("/dev/full")

    with monkeypatch.context() as patch:
        patch.setattr(assembly, "remove_partial", remove_partial_then_plant)
        with pytest.raises(DiskFull) as error:
            train(tiny_cfg("train.steps=4", "train.ckpt_every=2", "train.resume=auto"), tmp_path)
    message = one_line(error.value)
    assert message == str(error.value) and "\n" not in message
    assert f"no space left on the device writing {target}: it needs " in message, message
    assert "(no space left on device)" in message and f"hydra.run.dir={tmp_path} train.resume=auto" in message
    assert error.value.errno == errno.ENOSPC
    assert (ckpts / "last.pt").read_bytes() == good  # the last good checkpoint, untouched
    assert load_checkpoint(ckpts / "last.pt")["trainer"]["step"] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000002.pt"]  # no .tmp, no link, no step 4
    assert not list(tmp_path.rglob(".*.tmp"))
    assert train(tiny_cfg("train.steps=4", "train.ckpt_every=2", "train.resume=auto"), tmp_path)["step"] == 4
    assert load_checkpoint(target)["trainer"]["step"] == 4
