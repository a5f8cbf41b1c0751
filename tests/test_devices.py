"""Choosing the GPU: every selection a user makes (`device=auto` on one GPU, `cuda:N`, several processes with one GPU
each, one visible GPU per SLURM task), run on this CPU-only machine against PyTorch's own checks (tests/fake_gpu.py),
through each command that takes `device=`. The GPU tier (tests/test_gpu.py) runs the same commands on a real GPU."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_command
from fake_gpu import fake_gpus
from sagan.utils.errors import UserError
from sagan.utils.processes import World, init_distributed, resolve_device

TESTS = Path(__file__).parent

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="shows a CPU-only machine as a GPU one")


@pytest.fixture
def one_process(monkeypatch):
    """No torchrun variables: a single process, as `sagan-train` started by hand."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_device_auto_on_a_one_gpu_machine_takes_gpu_0(one_process):
    # The bug this file exists for: 'auto' became torch.device("cuda") without an index, which set_device refuses.
    with fake_gpus(1) as chosen:
        world, device = init_distributed("auto", timeout_min=1)
    assert (world.size, device, chosen) == (1, torch.device("cuda", 0), [0])


@pytest.mark.parametrize(
    "name, world, gpus, index",
    [
        ("cuda", World(), 1, 0),  # one process, named without an index
        ("cuda:1", World(), 2, 1),  # one process on the second GPU
        ("auto", World(rank=3, local_rank=3, size=4), 4, 3),  # torchrun --nproc_per_node=4: the local rank's GPU
        ("cuda", World(rank=9, local_rank=1, size=16), 8, 1),  # second machine of 2 x 8 GPUs
        ("auto", World(rank=5, local_rank=1, size=8), 1, 0),  # SLURM --gpus-per-task=1: each task sees one GPU
    ],
)
def test_each_selection_gives_a_device_set_device_accepts(name, world, gpus, index):
    with fake_gpus(gpus) as chosen:
        device = resolve_device(name, world)
        torch.cuda.set_device(device)  # PyTorch's own check of the argument
    assert device == torch.device("cuda", index) and chosen == [index]


@pytest.mark.parametrize(
    "name, world, gpus, message",
    [
        ("cuda:2", World(), 2, "sees 2 GPU(s), cuda:0 to cuda:1"),
        ("cuda:1", World(rank=1, local_rank=1, size=2), 2, "each process then takes the GPU of its local rank"),
        ("gpu", World(), 1, "unknown device 'gpu'"),
    ],
)
def test_impossible_selections_are_refused_before_any_gpu_work(name, world, gpus, message):
    with fake_gpus(gpus) as chosen:
        with pytest.raises(UserError, match=re.escape(message)):
            resolve_device(name, world)
    assert not chosen


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU is visible: use device=cpu or device=auto"):
        resolve_device("cuda")


def test_two_processes_pass_pytorchs_checks_and_reach_nccl(tmp_path):
    """torchrun with 2 processes on a machine shown with 2 GPUs: each sets its local rank's GPU and hands it to
    init_process_group, whose checks pass; NCCL's process group, which needs real GPUs, is as far as a CPU gets."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(TESTS / "fake_gpu_worker.py"), "2", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        line = (tmp_path / f"rank{rank}.txt").read_text()
        assert line.startswith(f"rank {rank}: set_device [{rank}]: "), line
        assert "NCCL" in line and "index" not in line and "device_id" not in line, line


@pytest.mark.parametrize("command", ["train", "fid", "sample", "attention"])
def test_every_command_reaches_the_gpu_with_device_auto(command, trained, one_process, tmp_path, monkeypatch, capsys):
    """Each command with device=auto on a one-GPU machine gets as far as the first tensor on the GPU: every device
    check before it (set_device's, where the command calls it) passed."""
    ckpt = f"ckpt={trained['cond']}"
    argv = {
        "train": [*TINY, "train.steps=1", f"hydra.run.dir={tmp_path / 'run'}"],
        "fid": [ckpt, "ref=demo", "n=8", "ref_n=8", "isc=false"],
        "sample": [ckpt, "n=4", f"out={tmp_path / 'samples'}"],
        "attention": [ckpt, f"out={tmp_path / 'attention'}"],
    }[command]
    with fake_gpus(1) as chosen:
        code, _, stderr = run_command(command, [*argv, "device=auto"], monkeypatch, capsys)
    assert code == 1
    assert "NoGPU: the first CUDA initialisation" in stderr, stderr
    assert "Expected a torch.device" not in stderr
    assert chosen == ([0] if command in ("train", "fid") else [])  # the commands that may run under torchrun
