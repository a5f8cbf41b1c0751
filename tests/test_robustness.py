import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import WEIGHTS, PixelFeatures, needs_weights
from sagan.checkpoint import load_checkpoint
from sagan.training.loop import train
from sagan.training.divergence import Diverged
from sagan.training.step import Trainer
from test_ddp import worker_pid


@pytest.fixture
def poison_at(monkeypatch):
    """Make G's parameters NaN right after the given step, `times` times (a test hook, not a config switch)."""

    def install(step: int, times: int = 1) -> None:
        original = Trainer.train_step
        left = [times]

        def train_step(self, batches):
            losses = original(self, batches)
            if self.step == step and left[0] > 0:
                left[0] -= 1
                with torch.no_grad():
                    next(self.G.parameters()).fill_(float("nan"))
            return losses

        monkeypatch.setattr(Trainer, "train_step", train_step)

    return install


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path, poison_at):
    poison_at(step=3)
    with pytest.raises(Diverged, match=r"non-finite .*G parameters \(at step 4\).*seen at step 4.*last good one is .*last\.pt"):
        train(tiny_cfg("train.steps=8", "train.ckpt_every=2", "logger.log_every=2"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["trainer"]["step"] == 2  # nothing written after the poison
    assert all(torch.isfinite(v).all() for v in state["trainer"]["G"].values() if v.is_floating_point())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt"]


def test_nan_rolls_back_with_a_lower_learning_rate(tiny_cfg, tmp_path, poison_at):
    poison_at(step=3, times=2)  # diverges again after the first rollback, before a new checkpoint: the factors compound
    overrides = ["train.steps=6", "train.ckpt_every=2", "logger.log_every=1", "train.nan_rollbacks=2", "train.nan_lr_factor=0.5"]
    assert train(tiny_cfg(*overrides), tmp_path)["step"] == 6
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["rollbacks"] == 2 and state["trainer"]["lr_scale"] == 0.25
    assert state["trainer"]["opt_g"]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 0.25)
    assert state["trainer"]["opt_d"]["param_groups"][0]["lr"] == pytest.approx(4e-4 * 0.25)


def test_rollback_factor_and_count_survive_a_resume(tiny_cfg, tmp_path, poison_at):
    poison_at(step=3)
    overrides = ["train.ckpt_every=2", "logger.log_every=1", "train.nan_rollbacks=1", "train.nan_lr_factor=0.5"]
    train(tiny_cfg("train.steps=4", *overrides), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["rollbacks"] == 1 and state["trainer"]["lr_scale"] == 0.5
    train(tiny_cfg("train.steps=6", "train.resume=auto", *overrides), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["trainer"]["step"] == 6 and state["rollbacks"] == 1
    assert state["trainer"]["opt_g"]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 0.5)
    assert state["trainer"]["opt_d"]["param_groups"][0]["lr"] == pytest.approx(4e-4 * 0.5)
    # The one rollback allowed is used up: a NaN after the resume stops the run.
    poison_at(step=7)
    with pytest.raises(Diverged):
        train(tiny_cfg("train.steps=8", "train.resume=auto", *overrides), tmp_path)


def test_rollbacks_are_bounded(tiny_cfg, tmp_path, poison_at):
    poison_at(step=3, times=5)  # diverges again after every rollback
    with pytest.raises(Diverged):
        train(tiny_cfg("train.steps=6", "train.ckpt_every=2", "logger.log_every=1", "train.nan_rollbacks=2"), tmp_path)


# --- subprocess runs: a real process, real signals -------------------------------------------------------------------

ARGS = ["experiment=demo", "model.g_ch=8", "model.d_ch=8", "data.size=64", "train.batch_size=8", "logger.mode=disabled",
        "logger.num_samples=4", "logger.attn_images=1", "logger.log_every=1", "logger.image_every=100000"]  # fmt: skip


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sagan.train", *ARGS, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def logged_step(run_dir: Path) -> int:
    log = run_dir / "train.log"
    steps = [int(line.split("step ")[1].split("/")[0]) for line in log.read_text().splitlines() if "img/s" in line] if log.exists() else []
    return max(steps, default=0)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "train.steps=100000", "train.ckpt_every=100000")
    wait_for(lambda: logged_step(run) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "train.resume=auto" in out and f"hydra.run.dir={run}" in out
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"]
    assert stopped >= 2
    resumed = start(run, f"train.steps={stopped + 2}", "train.resume=auto")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step {stopped}" in out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == stopped + 2


@pytest.mark.slow
def test_repeated_signals_still_stop_with_a_checkpoint(tmp_path):
    # Launchers repeat a stop request (torchrun forwards the SIGTERM that SLURM also sent to the workers): a repeat
    # must not turn the clean stop into an exit without a checkpoint.
    run = tmp_path / "run"
    proc = start(run, "train.steps=100000", "train.ckpt_every=100000", "model.g_ch=32")  # slower steps: a wide window
    wait_for(lambda: logged_step(run) >= 1)
    for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM):
        proc.send_signal(s)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "already stopping (after SIGUSR1)" in out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] >= 1


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_leaves_a_bad_checkpoint(tmp_path):
    """Kill -9 while a checkpoint is being written (a temporary file exists), three times; every time the newest
    checkpoint loads, and resume=auto continues from it. The write can finish between seeing its temporary file and
    the kill landing, so a kill that missed the write is retried (it must still leave a loadable last.pt)."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    assert start(run, "train.steps=2").wait(timeout=300) == 0
    mid_write_kills = 0
    for attempt in range(15):
        proc = start(run, "train.steps=100000", "train.ckpt_every=1", "train.resume=auto", "train.keep_last=1")
        own = f".{proc.pid}.tmp"  # atomic_write names its temporary file after the writing process
        wait_for(lambda: any(p.name.endswith(own) for p in ckpts.iterdir()), timeout=300)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        mid_write_kills += any(p.name.endswith(own) for p in ckpts.iterdir())  # the file outlived its writer
        load_checkpoint(ckpts / "last.pt")  # whatever happened, last.pt is whole
        if mid_write_kills == 3:
            break
    assert mid_write_kills == 3, f"only {mid_write_kills} of {attempt + 1} kills landed mid-write"
    step = load_checkpoint(ckpts / "last.pt")["trainer"]["step"]
    proc = start(run, f"train.steps={step + 1}", "train.resume=auto")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert load_checkpoint(ckpts / "last.pt")["trainer"]["step"] == step + 1
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())  # partial files of killed runs are cleaned up


# --- a stop request during an evaluation -----------------------------------------------------------------------------


STAND_IN_FORWARD = PixelFeatures.forward  # before any test wraps it


def signal_in_batch(monkeypatch, calls: list[int], signal_at: int) -> None:
    """The stand-in Inception network (tests/conftest.py) counts the batches it sees and sends this process SIGTERM
    from inside its `signal_at`-th batch, as a cluster does during a long FID (0: never)."""

    def counting(self, images):
        calls.append(len(images))
        if len(calls) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return STAND_IN_FORWARD(self, images)

    monkeypatch.setattr(PixelFeatures, "forward", counting)


# 16 reference images, then 32 generated ones, 4 per batch: batches 1-4 are the reference's, 5-12 the samples'.
EVAL = ["train.ckpt_every=100", "eval.every=2", "eval.num_samples=32", "eval.ref_images=16", "eval.isc=false",
        "metrics.batch_size=4"]  # fmt: skip


def stopped_in_evaluation(run: Path, caplog) -> None:
    """The run stopped at step 2, during its evaluation: last.pt of that step, and nothing of the evaluation."""
    assert "step 2: evaluation abandoned at" in caplog.text and "stopped by SIGTERM at step 2" in caplog.text
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2
    assert not (run / "checkpoints" / "best.pt").exists()  # an abandoned evaluation is no evaluation
    assert "metrics/fid" not in (run / "metrics.jsonl").read_text()


def test_sigterm_during_an_evaluation_abandons_it_checkpoints_that_step_and_resumes(
    tiny_cfg, tmp_path, monkeypatch, caplog, stand_in_inception
):
    caplog.set_level("INFO", logger="sagan")
    run, cache = tmp_path / "run", f"metrics.cache_dir={tmp_path / 'cache'}"
    calls: list[int] = []
    signal_in_batch(monkeypatch, calls, signal_at=6)  # the second batch of samples
    assert train(tiny_cfg("train.steps=4", *EVAL, cache), run)["step"] == 2
    assert len(calls) == 6  # not one batch after the request
    stopped_in_evaluation(run, caplog)
    # Resumed, it evaluates at its next eval.every step (as if none had been due at step 2), from the cached reference.
    calls.clear()
    signal_in_batch(monkeypatch, calls, signal_at=0)
    assert train(tiny_cfg("train.steps=4", "train.resume=auto", *EVAL, cache), run)["step"] == 4
    assert len(calls) == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "metrics/fid" in row] == [4]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["trainer"]["step"] == 4


def test_sigterm_during_the_reference_statistics_abandons_them_uncached(
    tiny_cfg, tmp_path, monkeypatch, caplog, stand_in_inception
):
    caplog.set_level("INFO", logger="sagan")
    calls: list[int] = []
    signal_in_batch(monkeypatch, calls, signal_at=2)  # the second batch of reference images
    assert train(tiny_cfg("train.steps=4", *EVAL, f"metrics.cache_dir={tmp_path / 'cache'}"), tmp_path / "run")["step"] == 2
    assert len(calls) == 2
    stopped_in_evaluation(tmp_path / "run", caplog)
    assert "reference statistics of train: abandoned, nothing cached" in caplog.text
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # never a part of the reference


@pytest.mark.slow
@needs_weights
def test_sigterm_to_one_rank_during_an_evaluation_stops_every_rank_promptly(tmp_path):
    """Under torchrun the ranks gather features at the end of an evaluation: a signal that reaches one rank alone must
    make all of them give up the evaluation at the same batch (none left waiting in the gather) and checkpoint."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sagan.train",
               *ARGS, "train.steps=4", "train.ckpt_every=100", "data.num_workers=0", "eval.every=2",
               "eval.num_samples=4000", "eval.ref_images=8", "eval.isc=false", "metrics.batch_size=4",
               f"metrics.inception_weights={WEIGHTS}", f"metrics.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = []
        for line in launcher.stdout:
            output.append(line)
            if "generated images" in line:  # rank 0's first progress line: 10 s into the samples, of minutes
                break
        os.kill(worker_pid(launcher.pid, rank=1), signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0  # within a cluster's grace period
    finally:
        if launcher.poll() is None:  # torchrun passes SIGTERM on, then kills its workers after 30 s
            launcher.terminate()
            launcher.wait(timeout=120)
    text = "".join(output) + launcher.stdout.read()
    assert "step 2: evaluation abandoned at generated images" in text and "stopped by a signal to another rank" in text
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2
    assert not (run / "checkpoints" / "best.pt").exists() and "metrics/fid" not in (run / "metrics.jsonl").read_text()
